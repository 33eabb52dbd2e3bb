"""The shipped tasks (built by `make data`), plain-text windows, and mixing shares."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data.mixing import mix
from data.sft import encode_text
from data.tasks import medical_term_pairs, parse_obo_terms, split_by_group
from tests.helpers import REPO

pytestmark = pytest.mark.fast  # every test here runs in this process: the fast tier (make test-fast)

DATA = Path(REPO) / ".cache" / "data"

OBO = """format-version: 1.2

[Term]
id: HP:0001166
name: Arachnodactyly
def: "Abnormally long and slender fingers (\\"spider fingers\\")." [HPO:probinson]
synonym: "Long slender fingers" EXACT layperson []
synonym: "Spider fingers" RELATED []

[Term]
id: HP:0000001
name: All

[Term]
id: HP:9999999
name: Gone
def: "An obsolete term." []
is_obsolete: true

[Typedef]
id: part_of
name: part of
"""


def test_obo_terms_become_instruction_pairs(tmp_path):
    path = tmp_path / "hp.obo"
    path.write_text(OBO)
    (term,) = parse_obo_terms(path)  # no definition, obsolete and Typedef stanzas are skipped
    assert term["definition"] == 'Abnormally long and slender fingers ("spider fingers").'
    assert term["synonyms"] == ["Long slender fingers"]  # EXACT synonyms only
    pairs = medical_term_pairs(term)
    assert pairs[0] == {
        "prompt": "What does the clinical term 'Arachnodactyly' mean?",
        "response": 'Abnormally long and slender fingers ("spider fingers").',
    }
    assert pairs[1]["prompt"] == "What does the clinical term 'Long slender fingers' mean?"
    assert pairs[1]["response"].startswith("'Long slender fingers' is another name for Arachnodactyly: ")


def test_split_keeps_groups_whole():
    groups = [[{"g": i, "k": k} for k in range(i % 3 + 1)] for i in range(100)]
    train, held_out = split_by_group(groups, eval_fraction=0.1, seed=0)
    assert len({r["g"] for r in held_out}) == 10
    assert not {r["g"] for r in train} & {r["g"] for r in held_out}
    assert len(train) + len(held_out) == sum(len(g) for g in groups)


def test_built_tasks_counts_and_disjoint_terms():
    counts = json.loads((DATA / "counts.json").read_text())
    assert counts["medical-terms"]["groups"] > 15_000  # HPO terms with a definition
    assert counts["medical-terms"]["eval"] > 1_000 and counts["wiki-general"]["groups"] > 90
    # The unseen set: every topic of the Python reference this Python carries, held out whole.
    docs = counts["python-docs"]
    assert docs["groups"] == docs["eval"] >= 50 and docs["train"] == 0 and docs["python"].startswith("3.")
    assert not (DATA / "python-docs" / "train.jsonl").exists()
    topic = json.loads((DATA / "python-docs" / "eval.jsonl").read_text().splitlines()[0])
    assert topic["title"] == "assert" and topic["text"].startswith('The "assert" statement')

    def names(split):
        lines = (DATA / "medical-terms" / f"{split}.jsonl").read_text().splitlines()
        return {json.loads(line)["prompt"] for line in lines}

    assert not names("train") & names("eval")
    article = json.loads((DATA / "wiki-general" / "train.jsonl").read_text().splitlines()[0])
    assert len(article["text"]) >= 500 and "[[" not in article["text"] and "'''" not in article["text"]


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_text_is_cut_into_windows_not_truncated():
    windows = encode_text(CharTokenizer(), "abcdefghij", max_seq_length=4)  # 10 chars + EOS = 11 tokens
    assert [w["input_ids"] for w in windows] == [[97, 98, 99, 100], [101, 102, 103, 104], [105, 106]]
    assert windows[0]["labels"] == [98, 99, 100, 101]  # every token is a target
    assert windows[-1]["labels"] == [106, 0]  # ends with EOS


def test_mixing_shares_are_reproducible():
    domain, general = np.full(80, 10), np.full(50, 30)  # example lengths
    drawn, report = mix(domain, general, fraction=0.2, seed=7)
    assert (report.domain_examples, report.general_examples) == (80, 20)
    assert report.general_example_share == pytest.approx(0.2)
    assert report.general_token_share == pytest.approx(600 / 1400)
    assert list(mix(domain, general, 0.2, seed=7)[0]) == list(drawn)
    assert list(mix(domain, general, 0.2, seed=8)[0]) != list(drawn)
    assert len(set(drawn.tolist())) == 20  # without replacement while enough
    _, many = mix(domain, general[:5], fraction=0.5, seed=0)
    assert many.general_examples == 80  # with replacement past that
    assert mix(domain, general, 0.0, seed=0)[1].general_examples == 0
    with pytest.raises(ValueError, match=r"data.general.fraction=1: must be in \[0, 1\)"):
        mix(domain, general, 1, seed=0)
