"""From the `data` config to encoded training and evaluation examples: the data side of a run.

    records (sources.py) -> tokens and masked labels (sft.py) -> general text mixed in (mixing.py)
    -> packed (packing.py) -> batches (loader.py)

Tokenizing is the slow part (tens of seconds for the medical task on one core), so it runs once
per node: local rank 0 of each node encodes in `num_proc` processes and saves the result under its
own `cache_dir`, keyed by everything it depends on (the data's content, the format and fields,
max_seq_length, the too-long policy, the tokenizer's vocabulary and template); the node's other
ranks wait and read it. Nodes need no shared disk for it, and two checkouts of the same data, at
different paths, share one key. A second run with the same key reads the cache instead.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from data.mixing import mix
from data.packing import pack
from data.sft import EncodeReport, encode_records
from data.sources import load_records
from durable import RefusedFile, read_torch_file, write_atomic

CACHE_VERSION = 1  # bump when the encoding itself changes


@dataclass
class PreparedData:
    train: list[dict]
    eval_sets: dict[str, list[dict]]  # "domain", "general": held-out examples, unpacked
    lines: list[str] = field(default_factory=list)  # what the startup banner says about the data
    seconds: float = 0.0
    cached: bool = False


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(
        (vocab + str(tokenizer.chat_template) + str(tokenizer.eos_token_id)).encode()
    ).hexdigest()


def file_fingerprint(path: str | Path) -> dict:
    """The data's content (its bytes, and the relative names and suffixes that select its reader),
    not where it lies: two checkouts of one file, on two nodes, share the key."""
    p = Path(path)
    if not p.exists():  # a hub dataset: its name stands for it
        return {"hub": str(path)}
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(p) if p.is_dir() else p.suffix}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
    return {"content": digest.hexdigest()}


_worker_state: dict = {}


def _init_worker(state: dict) -> None:
    _worker_state.update(state)


def _encode_chunk(records: list[dict]) -> tuple[list[dict], EncodeReport]:
    s = _worker_state
    return encode_records(
        s["tokenizer"], records, s["format"], s["max_seq_length"], s["too_long"], s["train_on_prompt"]
    )


def encode_parallel(
    tokenizer,
    records: list[dict],
    data_format: str,
    max_seq_length: int,
    too_long: str,
    num_proc: int,
    train_on_prompt: bool = False,
) -> tuple[list[dict], EncodeReport]:
    """encode_records over `num_proc` forked processes; same result and order as one process."""
    state = dict(
        tokenizer=tokenizer,
        format=data_format,
        max_seq_length=max_seq_length,
        too_long=too_long,
        train_on_prompt=train_on_prompt,
    )
    _worker_state.update(state)
    if num_proc <= 1 or len(records) < 1000:
        return _encode_chunk(records)
    # Never a bare fork: by now the process group (and, on GPUs, NCCL's and CUDA's threads) exist,
    # and a forked copy of a threaded process can deadlock. A fork server is a fresh interpreter
    # (started before any of that is inherited) that forks the workers from itself.
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    context = mp.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["data.dataset"])
    size = -(-len(records) // num_proc)
    chunks = [records[i : i + size] for i in range(0, len(records), size)]
    with context.Pool(num_proc, initializer=_init_worker, initargs=(state,)) as pool:
        parts = pool.map(_encode_chunk, chunks)
    examples, report = [], EncodeReport()
    for part_examples, part in parts:
        examples += part_examples
        for name in vars(report):
            setattr(report, name, getattr(report, name) + getattr(part, name))
    return examples, report


def cached(
    key: dict,
    cache_dir: str,
    compute: Callable[[], object],
    is_node_main: bool = True,
    gather: Callable[[object], list] = lambda value: [value],
):
    """compute() once per key and node (local rank 0), saved under cache_dir; every rank returns the
    same value. `gather` (all ranks call it: one value from every rank) waits for the computing
    ranks and brings back any error they met, so every rank raises it together, and none hangs."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{digest}.pt"
    hit, error = path.is_file(), None
    if is_node_main and not hit:
        try:
            value = compute()
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, partial(torch.save, value))
        except (ValueError, FileNotFoundError) as err:
            error = str(err)
        except Exception as err:  # anything else too: the waiting ranks must not wait for ever
            traceback.print_exc()
            error = f"{type(err).__name__}: {err} (traceback above, on the rank that tokenized)"
    first = next((e for e in gather(error) if e), None)
    if first is not None:
        raise ValueError(first)
    # The cache folder may be shared: reading it runs no code from it. It holds lists, dicts and
    # numbers, and the EncodeReport dataclasses, allowed by name.
    try:
        return read_torch_file(path, [EncodeReport]), hit
    except RefusedFile as err:
        raise ValueError(
            f"{path}: refused, not a tokenized cache this code wrote ({err.cause}); remove it to tokenize again"
        ) from None


def prepare(
    data_cfg,
    tokenizer,
    max_seq_length: int,
    seed: int,
    is_node_main: bool = True,
    gather: Callable[[object], list] = lambda value: [value],
    max_eval_examples: int | None = None,
) -> PreparedData:
    """Load, split, encode (cached), mix and pack, as `data_cfg` says. Call on every rank.

    The held-out sets ("domain", "general") stay unpacked, at most `max_eval_examples` each."""
    start = time.perf_counter()
    fields = {
        "prompt": data_cfg.prompt_field,
        "response": data_cfg.response_field,
        "messages": data_cfg.messages_field,
        "text": data_cfg.text_field,
    }
    general, unseen = data_cfg.general, data_cfg.unseen
    sources = {
        # name: (path, its format, config key, eval path, the eval path's format, fields)
        "domain": (data_cfg.path, data_cfg.format, "data.path", data_cfg.eval_path, data_cfg.format, fields),
        # The general records may be instructions (the model's own answers, replayed); the general
        # held-out set is plain text either way, so every mix is measured on the same text.
        "general": (
            general.path,
            general.format,
            "data.general.path",
            general.eval_path,
            "text",
            {**fields, "text": general.text_field},
        ),
        # Evaluated only: nothing of it is ever trained on.
        "unseen": (None, "text", "data.unseen.path", unseen.eval_path, "text", {"text": unseen.text_field}),
    }
    # The general held-out set is read even when nothing general is mixed in: forgetting is
    # measured on it whatever the mix (fraction 0 is the experiment's control).
    if not (general.path and general.fraction) and not general.eval_path:
        del sources["general"]
    if not unseen.eval_path:
        del sources["unseen"]

    def encode_all() -> dict:
        out = {}
        for name, (path, data_format, key, eval_path, eval_format, source_fields) in sources.items():
            # The general training text is encoded whenever it is named, mixed in or not, so runs
            # that differ only in data.general.fraction share one cache entry.
            records = (
                load_records(path, data_format, source_fields, key, data_cfg.subset, data_cfg.split)
                if path
                else []
            )
            if eval_path:
                held_out = load_records(
                    eval_path, eval_format, source_fields, key.replace("path", "eval_path")
                )
            elif name == "domain" and data_cfg.eval_fraction > 0:
                order = list(range(len(records)))
                random.Random(seed).shuffle(order)
                n_eval = max(1, round(len(records) * data_cfg.eval_fraction))
                held_out = [records[i] for i in sorted(order[:n_eval])]
                records = [records[i] for i in sorted(order[n_eval:])]
            else:
                held_out = []
            for split, split_records in (("train", records), ("eval", held_out)):
                if not split_records:
                    continue
                examples, report = encode_parallel(
                    tokenizer,
                    split_records,
                    data_format if split == "train" else eval_format,
                    max_seq_length,
                    data_cfg.too_long,
                    data_cfg.num_proc,
                    data_cfg.train_on_prompt,
                )
                if not examples:
                    what, where = (
                        ("train on", f"{key}={path}")
                        if split == "train"
                        else (
                            "evaluate on",
                            f"{key.replace('path', 'eval_path')}={eval_path}"
                            if eval_path
                            else f"{key}={path}",
                        )
                    )
                    raise ValueError(f"{where}: no example left to {what} ({report.describe()})")
                out[f"{name}/{split}"] = (examples, report)
        return out

    key = {
        "version": CACHE_VERSION,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "max_seq_length": max_seq_length,
        "seed": seed,
        "data": _encoding_settings(data_cfg),
        "files": [file_fingerprint(p) for s in sources.values() for p in (s[0], s[3]) if p],
    }
    encoded, hit = cached(key, data_cfg.cache_dir, encode_all, is_node_main, gather)

    lines = []
    for name, (_, report) in encoded.items():
        lines.append(f"{name + ':':<15} {report.describe()}")
    train, _ = encoded["domain/train"]
    if data_cfg.max_train_examples is not None and data_cfg.max_train_examples < len(train):
        train = subsample(train, data_cfg.max_train_examples, seed)
        lines.append(f"data.max_train_examples: training on {len(train)} of the domain examples")
    if general.fraction and "general/train" in encoded:
        train, mix_report = mix(train, encoded["general/train"][0], general.fraction, seed)
        lines.append(f"mixing: {mix_report.describe()}")
    if data_cfg.packing:
        shuffled = list(train)
        random.Random(seed).shuffle(shuffled)  # so a packed sequence mixes sources, not runs of one
        train = pack(shuffled, max_seq_length)
        tokens = sum(len(e["input_ids"]) for e in train)
        lines.append(
            f"packing: {len(shuffled)} examples -> {len(train)} sequences of <= {max_seq_length} tokens, "
            f"efficiency {tokens / (len(train) * max_seq_length):.1%} (tokens / positions)"
        )
    eval_sets = {
        name.split("/")[0]: subsample(examples, max_eval_examples, seed)
        for name, (examples, _) in encoded.items()
        if name.endswith("/eval")
    }
    return PreparedData(train, eval_sets, lines, time.perf_counter() - start, hit)


def subsample(examples: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded draw of `n` examples in their original order (all of them when n is None or larger):
    the same examples for every run with the same seed, so runs that differ elsewhere compare."""
    if n is None or n >= len(examples):
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in chosen]


def _encoding_settings(data_cfg) -> dict:
    """The data settings that change the encoded examples. Subsampling, mixing and packing come
    after the cache, the prompts are for generation, and the process count and cache folder change
    nothing, so they are left out of the key."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(data_cfg, resolve=True)
    for key in ("num_proc", "cache_dir", "packing", "max_train_examples", "prompts"):
        settings.pop(key, None)
    for key in ("fraction", "prompts"):
        settings["general"].pop(key, None)
    return settings
