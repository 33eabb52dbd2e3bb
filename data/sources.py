"""Read raw records through `datasets`: local JSON Lines, JSON, Parquet or text files, or hub datasets.

Whatever the source, records come out with the keys of their format: `prompt` and `response`,
`messages`, or `text`. Errors name the file (and line), the config key and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FIELDS = {"prompt_response": ("prompt", "response"), "chat": ("messages",), "text": ("text",)}


def check_jsonl(path: Path, key: str) -> None:
    """Find the first malformed line ourselves: the JSON parser inside `datasets` does not say where."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{key}={path} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{key}={path} line {number}: a JSON object per line is expected")


def data_files(path: Path, key: str) -> list[Path]:
    """The file itself, or every readable file in a folder (sorted, so the order is reproducible)."""
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in BUILDERS)
        if not files:
            raise ValueError(f"{key}={path}: the folder holds no {', '.join(BUILDERS)} files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: no such file")
    if path.suffix not in BUILDERS:
        raise ValueError(f"{key}={path}: unknown file type; use one of {', '.join(BUILDERS)}")
    return [path]


def load_dataset_from(path: str, key: str, subset: str | None = None, split: str = "train"):
    """A `datasets.Dataset` from a local file, or from the hub when `path` is a hub name (needs network)."""
    from datasets import load_dataset

    local = Path(path)
    if not local.exists() and HUB_ID.match(path) and local.suffix not in BUILDERS:
        return load_dataset(path, subset, split=split)
    files = data_files(local, key)
    builders = {BUILDERS[f.suffix] for f in files}
    if len(builders) > 1:
        raise ValueError(
            f"{key}={path}: the folder mixes file types ({', '.join(sorted(builders))}); use one"
        )
    (builder,) = builders
    for file in files:
        if file.stat().st_size == 0:
            raise ValueError(f"{key}={file}: no records (empty file)")
        if file.suffix == ".jsonl":
            check_jsonl(file, key)
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        dataset = load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
    except Exception as err:  # datasets wraps the parser's error in several layers
        raise ValueError(
            f"{key}={path}: could not be read as {builder} ({type(err).__name__}: {err})"
        ) from None
    return dataset


class Records:
    """A source's records, read lazily: a `datasets.Dataset` (memory-mapped Arrow, so it travels to
    the tokenizing processes by reference) and which of its columns are our fields."""

    def __init__(self, dataset, columns: dict[str, str]):
        self.dataset = dataset
        self.columns = columns  # our name -> theirs

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices) -> dict[str, list]:
        """The records at `indices` (a range or an index array) as columns under our names."""
        if isinstance(indices, range):
            rows = self.dataset[indices.start : indices.stop]
        else:
            rows = self.dataset[[int(i) for i in indices]]
        return {ours: rows[theirs] for ours, theirs in self.columns.items()}


def open_records(
    path: str,
    data_format: str,
    fields: dict[str, str],
    *,
    key: str = "data.path",
    subset: str | None = None,
    split: str = "train",
) -> Records:
    """Records of `data_format`, their fields found under the configured names (`fields`: ours -> theirs)."""
    dataset = load_dataset_from(path, key, subset, split)
    if len(dataset) == 0:
        raise ValueError(f"{key}={path}: no records")
    prefix = key.rsplit(".", 1)[0]
    for ours in FIELDS[data_format]:
        theirs = fields[ours]
        if theirs not in dataset.column_names:
            raise ValueError(
                f"{prefix}.{ours}_field={theirs}: no such field in {path}; "
                f"fields found: {', '.join(dataset.column_names)}"
            )
    return Records(dataset, {ours: fields[ours] for ours in FIELDS[data_format]})


def load_records(
    path: str,
    data_format: str,
    fields: dict[str, str],
    *,
    key: str = "data.path",
    subset: str | None = None,
    split: str = "train",
) -> list[dict]:
    """Every record as a dict under our field names (small sources; the pipeline reads in batches)."""
    records = open_records(path, data_format, fields, key=key, subset=subset, split=split)
    columns = records.batch(range(len(records)))
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def read_questions(path: str | Path) -> list[str]:
    """A questions file (eval.own_answers.prompts, the self-replay questions): one a line, blank lines skipped."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
