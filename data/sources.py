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


def load_dataset_from(path: str, key: str, subset: str | None = None, split: str = "train"):
    """A `datasets.Dataset` from a local file, or from the hub when `path` is a hub name (needs network)."""
    from datasets import load_dataset

    local = Path(path)
    if not local.exists() and HUB_ID.match(path) and local.suffix not in BUILDERS:
        return load_dataset(path, subset, split=split)
    if not local.is_file():
        raise FileNotFoundError(f"{key}={path}: no such file")
    builder = BUILDERS.get(local.suffix)
    if builder is None:
        raise ValueError(f"{key}={path}: unknown file type; use one of {', '.join(BUILDERS)}")
    if local.stat().st_size == 0:
        raise ValueError(f"{key}={path}: no records (empty file)")
    if local.suffix == ".jsonl":
        check_jsonl(local, key)
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        dataset = load_dataset(builder, data_files=str(local), split="train", **options)
    except Exception as err:  # datasets wraps the parser's error in several layers
        raise ValueError(
            f"{key}={path}: could not be read as {builder} ({type(err).__name__}: {err})"
        ) from None
    return dataset


def load_records(
    path: str,
    data_format: str,
    fields: dict[str, str],
    key: str = "data.path",
    subset: str | None = None,
    split: str = "train",
) -> list[dict]:
    """Records of `data_format`, renamed from the configured field names (`fields`: our name -> theirs)."""
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
    return [{ours: row[fields[ours]] for ours in FIELDS[data_format]} for row in dataset]
