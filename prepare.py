"""Tokenize a run's data before the run: the cache train.py will map, written once, its counts printed.

    python prepare.py <the same overrides as train.py>        (make prepare ARGS="...")

A long job runs this first, once on each node (the cache lives under each node's data.cache_dir),
so that the job's start maps the tokens in seconds instead of tokenizing while every GPU waits.
It reads the data and the tokenizer only: no process group, no model weights, no run folder.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import config
from config import settings
from data.dataset import prepare as prepare_data
from fsdp.memory import gib
from fsdp.model import resolve_model_folder


def main(argv: list[str]) -> int:
    try:
        cfg = config.load_config(argv)
        config.validate(cfg, config.world_size_from_env())
    except config.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_folder(cfg.model.name_or_path))
    max_seq_length = settings.geometry(cfg, config.world_size_from_env()).max_seq_length
    try:
        data = prepare_data(
            cfg.data, tokenizer, max_seq_length, seed=cfg.seed, max_eval_examples=cfg.eval.max_examples
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    print(describe(data.folder, data.meta, data.cached, time.perf_counter() - start))
    for line in data.lines:
        print(f"    {line}")
    return 0


def describe(folder: Path, meta: dict, was_cached: bool, seconds: float) -> str:
    """Where the tokens are, how many, their bytes on disk, and how fast they were made."""
    tokens = sum(part["tokens"] for part in meta["parts"].values())
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    made = (
        "already prepared"
        if was_cached
        else f"tokenized in {meta['seconds']:.1f} s by {meta['num_proc']} processes "
        f"({meta['tokens_per_second']:,} tokens/s)"
    )
    return (
        f"data       {folder}: {tokens:,} tokens, {gib(size)} on disk ({size / max(tokens, 1):.2f} bytes per "
        f"token); {made}; {seconds:.1f} s in all"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
