"""From the `data` config to tokens in flat arrays: the data side of a run.

    records (sources.py) -> token ids and targets (sft.py, chat.py) -> flat arrays on disk
    (tokens.py) -> general examples mixed in (mixing.py) -> packed (packing.py) -> batches (loader.py)

Tokenizing runs once per node: local rank 0 of each node encodes the records in batches, in
`num_proc` processes, and streams the result into flat arrays in a folder under its own
`cache_dir`, named by everything the tokens depend on (the data's content, the format and fields,
max_seq_length, the too-long policy, the tokenizer's vocabulary and template). Every rank of the
node then maps the same files: the node holds one copy, in its page cache. Nodes need no shared
disk for it, and two checkouts of the same data, at different paths, share one folder.

A start that finds its folder reads no record and hashes no data file again: a file's digest is
kept beside its path, size and modification time (`cache_dir/digests`). Nothing is unpickled;
subsampling, mixing, packing and the loader's order work on per-example lengths and indices.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data.mixing import mix
from data.packing import pack
from data.sft import EncodedChunk, EncodeReport, encode_batch
from data.sources import Records, open_records
from data.tokens import Sequences, TokenArrays, TokenArraysWriter, token_dtype
from durable import publish_folder, write_json

CACHE_VERSION = 2  # bump when the encoding or the layout on disk changes
CHUNK_RECORDS = 2048  # records per batch handed to a tokenizing process


@dataclass
class PreparedData:
    train: Sequences
    eval_sets: dict[str, list[dict]]  # "domain", "general", "unseen": held-out examples, unpacked
    lines: list[str] = field(default_factory=list)  # what the startup banner says about the data
    seconds: float = 0.0
    cached: bool = False
    folder: Path | None = None  # where the tokens are mapped from
    meta: dict = field(default_factory=dict)  # the folder's meta.json: counts, reports, tokenizing speed


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(
        (vocab + str(tokenizer.chat_template) + str(tokenizer.eos_token_id)).encode()
    ).hexdigest()


def file_fingerprint(path: str | Path, digests: Path | None = None, remember: bool = True) -> dict:
    """The data's content (its bytes, and the relative names and suffixes that select its reader),
    not where it lies: two checkouts of one file, on two nodes, share the key.

    With `digests` (a folder), a file whose path, size and modification time are as when it was
    last hashed is not read again; `remember` writes what was hashed there."""
    p = Path(path)
    if not p.exists():  # a hub dataset: its name stands for it
        return {"hub": str(path)}
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    combined = hashlib.sha256()
    for f in files:
        name = f.relative_to(p) if p.is_dir() else p.suffix
        combined.update(f"{name}\0{f.stat().st_size}\0{_file_digest(f, digests, remember)}\0".encode())
    return {"content": combined.hexdigest()}


def _file_digest(path: Path, digests: Path | None, remember: bool) -> str:
    stat = path.stat()
    seen = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    note = digests / f"{hashlib.sha256(seen['path'].encode()).hexdigest()[:20]}.json" if digests else None
    if note is not None and note.is_file():
        try:
            known = json.loads(note.read_text())
            if {k: known.get(k) for k in seen} == seen and isinstance(known.get("sha256"), str):
                return known["sha256"]
        except (OSError, ValueError):
            pass  # unreadable: hashed again and rewritten
    digest = hash_file(path)
    if note is not None and remember:
        note.parent.mkdir(parents=True, exist_ok=True)
        write_json(note, {**seen, "sha256": digest})
    return digest


def hash_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB pieces (about 1 s per GB here)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Part:
    """Records to encode into one part of the cache: a source's training or held-out records."""

    name: str  # "domain/train", "general/eval", ...
    records: Records
    indices: range | np.ndarray
    data_format: str
    where: str  # the config key and path its records came from, for errors

    @property
    def file_name(self) -> str:
        return self.name.replace("/", "-")


@dataclass
class EncodeSettings:
    max_seq_length: int
    too_long: str
    train_on_prompt: bool


@dataclass
class EncodeTask:
    """One batch of records for a tokenizing process: the records travel by reference (a
    memory-mapped Arrow table pickles as its file's name), so a task is a few hundred bytes."""

    part: int
    records: Records
    data_format: str
    indices: range | np.ndarray


_worker: dict = {}


def _init_worker(tokenizer, settings: EncodeSettings) -> None:
    # Each process is one tokenizing thread: num_proc of them already fill the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=tokenizer, settings=settings)


def _encode_task(task: EncodeTask) -> EncodedChunk:
    s: EncodeSettings = _worker["settings"]
    columns = task.records.batch(task.indices)
    return encode_batch(
        _worker["tokenizer"],
        columns,
        task.data_format,
        max_seq_length=s.max_seq_length,
        too_long=s.too_long,
        train_on_prompt=s.train_on_prompt,
    )


def _tasks(parts: list[Part]) -> Iterator[EncodeTask]:
    for number, part in enumerate(parts):
        for start in range(0, len(part.indices), CHUNK_RECORDS):
            yield EncodeTask(
                number, part.records, part.data_format, part.indices[start : start + CHUNK_RECORDS]
            )


class EncodingPool:
    """`num_proc` tokenizing processes, or this process alone (num_proc 1, or little data).

    Started before the records are read, so that the processes' start (a fresh interpreter that
    imports torch and transformers, a few seconds) overlaps with reading them."""

    def __init__(self, tokenizer, settings: EncodeSettings, num_proc: int):
        self.tokenizer, self.settings, self.num_proc, self.pool = tokenizer, settings, num_proc, None

    def __enter__(self) -> EncodingPool:
        if self.num_proc <= 1:
            return self
        # Never a bare fork: by now the process group (and, on GPUs, NCCL's and CUDA's threads) exist,
        # and a forked copy of a threaded process can deadlock. A fork server is a fresh interpreter
        # (started before any of that is inherited) that forks the workers from itself, with what
        # they import already imported.
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        context = mp.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(["data.dataset", "transformers"])
        self.pool = context.Pool(
            self.num_proc, initializer=_init_worker, initargs=(self.tokenizer, self.settings)
        )
        return self

    def map(self, tasks: Iterator[EncodeTask]) -> Iterator[EncodedChunk]:
        """The encoded chunks, in task order."""
        if self.pool is None:
            _worker.update(tokenizer=self.tokenizer, settings=self.settings)
            return map(_encode_task, tasks)
        return self.pool.imap(_encode_task, tasks, chunksize=1)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def encode_parts(pool: EncodingPool, parts: list[Part], folder: Path, progress: bool = True) -> dict:
    """Encode every part into `folder`, chunk by chunk, in order (the result does not depend on the
    number of processes), with a progress bar; returns the folder's meta."""
    dtype = token_dtype(len(pool.tokenizer))
    writers = [TokenArraysWriter(folder, part.file_name, dtype) for part in parts]
    reports = [EncodeReport() for _ in parts]
    fallbacks, start = 0, time.perf_counter()
    bar = _progress_bar(sum(len(part.indices) for part in parts), progress)
    for task, chunk in zip(_tasks(parts), pool.map(_tasks(parts)), strict=True):
        writers[task.part].append(chunk.tokens, chunk.targets, chunk.lengths)
        reports[task.part].add(chunk.report)
        fallbacks += chunk.chat_fallbacks
        bar.update(len(task.indices))
        tokens = sum(r.tokens for r in reports)
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    processes = pool.num_proc if pool.pool is not None else 1
    meta = {"parts": {}, "seconds": round(seconds, 3), "num_proc": processes, "chat_fallbacks": fallbacks}
    for part, writer, report in zip(parts, writers, reports, strict=True):
        meta["parts"][part.name] = {**writer.close(), "file": part.file_name, "report": asdict(report)}
        if not report.examples:
            what = "train on" if part.name.endswith("/train") else "evaluate on"
            raise ValueError(f"{part.where}: no example left to {what} ({report.describe()})")
    meta["tokens_per_second"] = round(sum(r.tokens for r in reports) / max(seconds, 1e-9))
    return meta


def _progress_bar(total: int, show: bool):
    from tqdm import tqdm

    # In a log file (not a terminal) a line every 30 s is enough.
    interval = 0.5 if sys.stderr.isatty() else 30
    return tqdm(
        total=total,
        desc="tokenizing",
        unit=" records",
        disable=not show,
        mininterval=interval,
        file=sys.stderr,
    )


def cached(
    key: dict,
    cache_dir: str,
    compute: Callable[[Path], dict],
    is_node_main: bool = True,
    gather: Callable[[object], list] = lambda value: [value],
) -> tuple[Path, dict, bool]:
    """compute(folder) once per key and node (local rank 0): it writes the arrays into a new folder
    and returns their meta, published under cache_dir with the key. Every rank returns the folder,
    its meta and whether it was there already. `gather` (all ranks call it: one value from every
    rank) waits for the computing ranks and brings back any error they met, so every rank raises
    it together, and none hangs."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(cache_dir) / digest
    hit, error = (folder / "meta.json").is_file(), None
    if is_node_main and not hit:
        remove_killed_writes(Path(cache_dir))
        # Two nodes may share a cache_dir: each writes its own temporary folder.
        tmp = folder.with_name(f"{digest}.tmp-{socket.gethostname()}-{os.getpid()}")
        try:
            tmp.mkdir(parents=True)
            meta = compute(tmp)
            write_json(tmp / "meta.json", {"version": CACHE_VERSION, "key": key, **meta})
            publish_folder(tmp, folder)
        except (ValueError, FileNotFoundError) as err:
            error = str(err)
        except Exception as err:  # anything else too: the waiting ranks must not wait for ever
            traceback.print_exc()
            error = f"{type(err).__name__}: {err} (traceback above, on the rank that tokenized)"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # published (gone already), or failed
    first = next((e for e in gather(error) if e), None)
    if first is not None:
        raise ValueError(first)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
            raise ValueError("its meta.json is for another key")
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{folder}: refused, not a tokenized cache this code wrote ({err}); remove it to tokenize again"
        ) from None
    return folder, meta, hit


def remove_killed_writes(cache_dir: Path) -> list[Path]:
    """Remove the temporary folders that tokenizing processes of this host left when they were
    killed (a preempted job: nothing ran their clean-up), each as large as its data's tokens.
    A folder is this host's by its name, and left while its process is alive, or of another host."""
    removed = []
    host = socket.gethostname()
    for tmp in cache_dir.glob(f"*.tmp-{host}-*") if cache_dir.is_dir() else ():
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not tmp.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        except PermissionError:
            pass  # alive, another user's
    return removed


def open_parts(folder: Path, meta: dict) -> dict[str, TokenArrays]:
    """Map every part of a cache folder; a damaged one is refused in one line."""
    try:
        return {name: TokenArrays.open(folder, part["file"], part) for name, part in meta["parts"].items()}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{folder}: refused, not a tokenized cache this code wrote ({err}); remove it to tokenize again"
        ) from None


def prepare(
    data_cfg,
    tokenizer,
    max_seq_length: int,
    *,
    seed: int,
    is_node_main: bool = True,
    gather: Callable[[object], list] = lambda value: [value],
    max_eval_examples: int | None = None,
    progress: bool = True,
) -> PreparedData:
    """Load, split, encode (cached), mix and pack, as `data_cfg` says. Call on every rank.

    The held-out sets ("domain", "general", "unseen") stay unpacked, at most `max_eval_examples`
    each, as example dicts."""
    start = time.perf_counter()
    sources = _sources(data_cfg)
    cache_dir = Path(data_cfg.cache_dir)
    key = {
        "version": CACHE_VERSION,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "max_seq_length": max_seq_length,
        "seed": seed,
        "data": _encoding_settings(data_cfg),
        "files": [
            file_fingerprint(path, cache_dir / "digests", remember=is_node_main)
            for source in sources.values()
            for path in (source.path, source.eval_path)
            if path
        ],
    }
    settings = EncodeSettings(max_seq_length, data_cfg.too_long, data_cfg.train_on_prompt)

    def encode_all(folder: Path) -> dict:
        with EncodingPool(tokenizer, settings, encoding_processes(data_cfg.num_proc, sources)) as pool:
            parts = _parts(sources, data_cfg, seed)  # the records are read while the processes start
            return encode_parts(pool, parts, folder, progress)

    folder, meta, hit = cached(key, data_cfg.cache_dir, encode_all, is_node_main=is_node_main, gather=gather)
    parts = open_parts(folder, meta)

    lines = []
    for name, part in meta["parts"].items():
        lines.append(f"{name + ':':<15} {EncodeReport(**part['report']).describe()}")
    if meta.get("chat_fallbacks"):
        lines.append(f"chat: {meta['chat_fallbacks']} conversations' turns found prefix by prefix (slower)")
    train = training_sequences(parts, data_cfg, max_seq_length, seed, lines)
    eval_sets = {}
    for name, part in parts.items():
        if name.endswith("/eval"):
            chosen = subsample(len(part), max_eval_examples, seed)
            eval_sets[name.split("/")[0]] = [part.example(int(i)) for i in chosen]
    return PreparedData(train, eval_sets, lines, time.perf_counter() - start, hit, folder, meta)


def training_sequences(
    parts: dict[str, TokenArrays], data_cfg, max_seq_length: int, seed: int, lines: list[str]
) -> Sequences:
    """The domain's training examples (a seeded subset with data.max_train_examples), general ones
    drawn in (data.general.fraction), packed (data.packing): index arrays, no token is copied."""
    domain = parts["domain/train"]
    chosen = subsample(len(domain), data_cfg.max_train_examples, seed)
    if len(chosen) < len(domain):
        lines.append(f"data.max_train_examples: training on {len(chosen)} of the domain examples")
    stores, piece_part, piece_example = [domain], [np.zeros(len(chosen), np.uint8)], [chosen]
    general = data_cfg.general
    if general.fraction and "general/train" in parts:
        pool = parts["general/train"]
        drawn, report = mix(domain.input_lengths[chosen], pool.input_lengths, general.fraction, seed)
        stores.append(pool)
        piece_part.append(np.ones(len(drawn), np.uint8))
        piece_example.append(drawn)
        lines.append(f"mixing: {report.describe()}")
    piece_part, piece_example = np.concatenate(piece_part), np.concatenate(piece_example)
    if not data_cfg.packing:
        return Sequences.one_per_example(stores, piece_part, piece_example)
    # Shuffled first, so a packed sequence mixes sources, not runs of one.
    order = list(range(len(piece_example)))
    random.Random(seed).shuffle(order)
    piece_part, piece_example = piece_part[order], piece_example[order]
    unpacked = Sequences.one_per_example(stores, piece_part, piece_example)
    starts = pack(unpacked.lengths, max_seq_length)
    packed = Sequences(stores, piece_part, piece_example, starts, packed=True)
    tokens = int(packed.lengths.sum())
    lines.append(
        f"packing: {len(unpacked)} examples -> {len(packed)} sequences of <= {max_seq_length} tokens, "
        f"efficiency {tokens / max(1, len(packed) * max_seq_length):.1%} (tokens / positions)"
    )
    return packed


def subsample(count: int, n: int | None, seed: int) -> np.ndarray:
    """The indices of a seeded draw of `n` of `count` examples, in their original order (all of them
    when n is None or larger): the same examples for every run with the same seed."""
    if n is None or n >= count:
        return np.arange(count, dtype=np.int64)
    return np.array(sorted(random.Random(seed).sample(range(count), n)), dtype=np.int64)


def encoding_processes(configured: int | None, sources: dict) -> int:
    """data.num_proc as set; unset, the cores this process may use (the node's other ranks wait
    meanwhile), or one for little data (under 4 MiB of local files: less time than the processes'
    start)."""
    if configured:
        return configured
    paths = [Path(p) for s in sources.values() for p in (s.path, s.eval_path) if p]
    if all(p.exists() for p in paths):  # not a hub dataset, whose size is unknown here
        files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
        if sum(f.stat().st_size for f in files) < 4 << 20:
            return 1
    return node_cores()


def node_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Source:
    path: str | None  # its training records, if any
    data_format: str
    key: str  # the config key of `path`
    eval_path: str | None
    eval_format: str
    fields: dict[str, str]


def _sources(data_cfg) -> dict[str, Source]:
    fields = {
        "prompt": data_cfg.prompt_field,
        "response": data_cfg.response_field,
        "messages": data_cfg.messages_field,
        "text": data_cfg.text_field,
    }
    general, unseen = data_cfg.general, data_cfg.unseen
    sources = {
        "domain": Source(
            path=data_cfg.path,
            data_format=data_cfg.format,
            key="data.path",
            eval_path=data_cfg.eval_path,
            eval_format=data_cfg.format,
            fields=fields,
        ),
        # The general records may be instructions (the model's own answers, replayed); the general
        # held-out set is plain text either way, so every mix is measured on the same text.
        "general": Source(
            path=general.path,
            data_format=general.format,
            key="data.general.path",
            eval_path=general.eval_path,
            eval_format="text",
            fields={**fields, "text": general.text_field},
        ),
        # Evaluated only: nothing of it is ever trained on.
        "unseen": Source(
            path=None,
            data_format="text",
            key="data.unseen.path",
            eval_path=unseen.eval_path,
            eval_format="text",
            fields={"text": unseen.text_field},
        ),
    }
    # The general held-out set is read even when nothing general is mixed in: forgetting is
    # measured on it whatever the mix (fraction 0 is the experiment's control).
    if not (general.path and general.fraction) and not general.eval_path:
        del sources["general"]
    if not unseen.eval_path:
        del sources["unseen"]
    return sources


def _parts(sources: dict[str, Source], data_cfg, seed: int) -> list[Part]:
    """What to encode: each source's training records and its held-out ones (a file of their own,
    or, for the domain, a seeded share of its records)."""
    parts = []
    for name, s in sources.items():
        where = f"{s.key}={s.path}"
        # The general training text is encoded whenever it is named, mixed in or not, so runs
        # that differ only in data.general.fraction share one cache entry.
        records = (
            open_records(
                s.path, s.data_format, s.fields, key=s.key, subset=data_cfg.subset, split=data_cfg.split
            )
            if s.path
            else None
        )
        train_indices: range | np.ndarray = range(len(records)) if records else range(0)
        held_out = None
        if s.eval_path:
            eval_key = s.key.replace("path", "eval_path")
            eval_records = open_records(s.eval_path, s.eval_format, s.fields, key=eval_key)
            held_out = Part(
                name=f"{name}/eval",
                records=eval_records,
                indices=range(len(eval_records)),
                data_format=s.eval_format,
                where=f"{eval_key}={s.eval_path}",
            )
        elif name == "domain" and data_cfg.eval_fraction > 0:
            order = list(range(len(records)))
            random.Random(seed).shuffle(order)
            n_eval = max(1, round(len(records) * data_cfg.eval_fraction))
            train_indices = np.array(sorted(order[n_eval:]), dtype=np.int64)
            held_out = Part(
                name=f"{name}/eval",
                records=records,
                indices=np.array(sorted(order[:n_eval]), dtype=np.int64),
                data_format=s.data_format,
                where=where,
            )
        if records is not None and len(train_indices):
            parts.append(
                Part(
                    name=f"{name}/train",
                    records=records,
                    indices=train_indices,
                    data_format=s.data_format,
                    where=where,
                )
            )
        if held_out is not None:
            parts.append(held_out)
    return parts


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
