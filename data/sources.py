"""Read raw records from local files through `datasets`: JSON Lines, JSON, Parquet, or plain text."""

from __future__ import annotations

from pathlib import Path

# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def _load(path: str | Path, key: str):
    from datasets import load_dataset

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: no such file")
    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise ValueError(f"{key}={path}: unknown file type; use one of {', '.join(BUILDERS)}")
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        dataset = load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # datasets wraps the parser's error in several layers
        raise ValueError(
            f"{key}={path}: could not be read as {builder} ({type(err).__name__}: {err})"
        ) from None
    if len(dataset) == 0:
        raise ValueError(f"{key}={path}: no records")
    return dataset


def _require(dataset, field: str, key: str, path) -> None:
    if field not in dataset.column_names:
        raise ValueError(
            f"{key}={field}: no such field in {path}; fields found: {', '.join(dataset.column_names)}"
        )


def load_prompt_response(
    path: str | Path, prompt_field: str = "prompt", response_field: str = "response"
) -> list[dict]:
    """Records with `prompt` and `response` keys, in file order. Errors name the file and the field."""
    dataset = _load(path, "data.path")
    _require(dataset, prompt_field, "data.prompt_field", path)
    _require(dataset, response_field, "data.response_field", path)
    return [{"prompt": r[prompt_field], "response": r[response_field]} for r in dataset]


def load_texts(path: str | Path, text_field: str = "text", key: str = "data.path") -> list[str]:
    """Documents: the `text_field` of each record (a .txt file is one document)."""
    dataset = _load(path, key)
    _require(dataset, text_field, key.rsplit(".", 1)[0] + ".text_field", path)
    return list(dataset[text_field])
