"""Read raw records: local JSON Lines files of prompt/response pairs (through `datasets`)."""

from __future__ import annotations

from pathlib import Path


def load_prompt_response(
    path: str | Path, prompt_field: str = "prompt", response_field: str = "response"
) -> list[dict]:
    """Records with `prompt` and `response` keys, in file order. Errors name the file and the field."""
    from datasets import load_dataset

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path={path}: no such file")
    try:
        dataset = load_dataset("json", data_files=str(path), split="train")
    except Exception as err:  # datasets wraps the JSON parser's error in several layers
        raise ValueError(f"data.path={path}: not valid JSON Lines ({type(err).__name__}: {err})") from None
    if len(dataset) == 0:
        raise ValueError(f"data.path={path}: no records")
    for field, key in ((prompt_field, "data.prompt_field"), (response_field, "data.response_field")):
        if field not in dataset.column_names:
            raise ValueError(
                f"{key}={field}: no such field in {path}; fields found: {', '.join(dataset.column_names)}"
            )
    return [{"prompt": r[prompt_field], "response": r[response_field]} for r in dataset]
