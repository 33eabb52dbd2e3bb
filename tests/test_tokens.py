"""Tokens in flat arrays: written in chunks, mapped back exactly, never turned into Python objects
by the loader, and a cached start that reads no record and hashes no file again."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from omegaconf import OmegaConf

from batch import BatchGeometry
from data import dataset
from data.loader import DistributedBatchLoader
from data.packing import pack
from data.tokens import Sequences, TokenArrays, TokenArraysWriter, token_dtype
from tests.helpers import DEFAULT_MODEL, ragged_examples


@pytest.mark.fast
def test_arrays_written_in_chunks_map_back_to_the_same_examples(tmp_path):
    examples = ragged_examples(50, vocab_size=60_000, seed=3)
    whole = TokenArrays.from_examples(examples)
    writer = TokenArraysWriter(tmp_path, "part", token_dtype(60_000))
    for first in range(0, 50, 16):  # as the tokenizing processes deliver: chunk by chunk
        chunk = TokenArrays.from_examples(examples[first : first + 16])
        writer.append(chunk.tokens, chunk.targets, np.diff(chunk.offsets))
    meta = writer.close()
    mapped = TokenArrays.open(tmp_path, "part", meta)
    assert meta == {"examples": 50, "tokens": whole.num_tokens, "dtype": "uint16"}
    assert isinstance(mapped.tokens, np.memmap) and mapped.tokens.dtype == np.uint16
    assert [mapped.example(i) for i in range(50)] == examples
    assert mapped.target_counts.tolist() == [sum(label != -100 for label in e["labels"]) for e in examples]
    # 2 bytes a token id, 1 a target flag, and 12 bytes an example (its offset and target count).
    size = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert size == 3 * whole.num_tokens + 12 * 50 + 8
    assert token_dtype(49_152) == np.uint16 and token_dtype(128_256) == np.uint32
    with pytest.raises(ValueError, match=r"does not fit in uint16"):
        TokenArraysWriter(tmp_path, "narrow", np.uint16).append(
            np.array([70_000]), np.array([1]), np.array([1])
        )
    (tmp_path / "part.targets").write_bytes(b"\0" * 10)  # a torn file
    with pytest.raises(ValueError, match=r"part.targets: 10 bytes, [\d,]+ expected"):
        TokenArrays.open(tmp_path, "part", meta)


@pytest.mark.fast
def test_packed_sequences_are_their_examples_end_to_end():
    examples = ragged_examples(6, min_len=3, max_len=9, seed=1)
    one_each = Sequences.from_examples(examples)
    starts = pack(one_each.lengths, 20)
    packed = Sequences(one_each.parts, one_each.piece_part, one_each.piece_example, starts, packed=True)
    joined = [packed.sequence(j) for j in range(len(packed))]
    assert sum(len(s["input_ids"]) for s in joined) == sum(len(e["input_ids"]) for e in examples)
    assert np.concatenate([s["labels"] for s in joined]).tolist() == [
        t for e in examples for t in e["labels"]
    ]
    assert packed.lengths.tolist() == [len(s["input_ids"]) for s in joined] and max(packed.lengths) <= 20
    assert packed.target_counts.sum() == one_each.target_counts.sum()


@pytest.mark.fast
def test_the_loader_never_holds_the_data_set_as_python_objects(tmp_path):
    """20,000 examples of 200 tokens on disk. As Python lists the tokens alone would take over
    100 MB (a pointer and an int object each); the loader, its epoch statistics and a few steps
    may allocate some arrays per example, and the tokens of its own micro-batches: under 128 bytes
    an example, where the tokens as lists would be over 7,000."""
    n, length = 20_000, 200
    rng = np.random.default_rng(0)
    writer = TokenArraysWriter(tmp_path, "domain-train", np.uint16)
    tokens = rng.integers(256, 49_152, n * length, dtype=np.uint16)
    targets = np.tile(np.r_[np.zeros(50), np.ones(length - 50)].astype(np.uint8), n)
    writer.append(tokens, targets, np.full(n, length))
    arrays = TokenArrays.open(tmp_path, "domain-train", writer.close())
    del tokens, targets
    tracemalloc.start()
    try:
        sequences = Sequences.one_per_example([arrays], np.zeros(n, np.uint8), np.arange(n))
        loader = DistributedBatchLoader(sequences, BatchGeometry(4, 2, 2, 256), rank=1, seed=0, pad_id=0)
        efficiency, targets_per_step = loader.epoch_statistics()
        steps = [loader.next_step() for _ in range(3)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 128 * n  # bytes: some int64 arrays per example (about 58 here), nothing per token
    assert efficiency == 1.0 and targets_per_step == 16 * (length - 50)
    assert [b.input_ids.shape for b in steps[0]] == [(4, length - 1)] * 2
    assert steps[0][0].step_totals == (16 * (length - 50), 16 * (length - 1))


@pytest.mark.fast
def test_a_cached_start_reads_no_record_and_hashes_no_file_again(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    records = tmp_path / "train.jsonl"
    records.write_text(
        "".join(json.dumps({"prompt": f"Q{i}?", "response": f"A{i}."}) + "\n" for i in range(40))
    )
    cfg = OmegaConf.load("conf/config.yaml").data
    cfg.path, cfg.cache_dir = str(records), str(tmp_path / "cache")
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    hashed = []
    real_hash = dataset.hash_file
    monkeypatch.setattr(dataset, "hash_file", lambda path: hashed.append(path.name) or real_hash(path))
    first = dataset.prepare(cfg, tokenizer, 64, seed=0, progress=False)
    assert hashed == ["train.jsonl"] and not first.cached

    def no_records(*args, **kwargs):
        raise AssertionError("a cached start read the records")

    real_open_records = dataset.open_records
    monkeypatch.setattr(dataset, "open_records", no_records)
    again = dataset.prepare(cfg, tokenizer, 64, seed=0, progress=False)
    assert again.cached and again.folder == first.folder and hashed == ["train.jsonl"]
    # The file touched (same bytes, a new mtime): hashed once more, and the same tokens are found.
    records.write_text(records.read_text())
    touched = dataset.prepare(cfg, tokenizer, 64, seed=0, progress=False)
    assert touched.cached and touched.folder == first.folder and hashed == ["train.jsonl"] * 2
    # Other bytes: another key, tokenized anew.
    monkeypatch.setattr(dataset, "open_records", real_open_records)
    records.write_text(records.read_text().replace("Q1?", "Q1 again?"))
    changed = dataset.prepare(cfg, tokenizer, 64, seed=0, progress=False)
    assert not changed.cached and changed.folder != first.folder


def test_a_killed_tokenizing_leaves_nothing_behind_for_long(tmp_path):
    """The temporary folder of a prepare killed on this host is removed by the next one; a live
    process's, or another host's (a shared cache_dir), is left alone."""
    import os
    import socket
    import subprocess
    import sys

    from data.dataset import remove_killed_writes

    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    killed = tmp_path / f"0123.tmp-{host}-{int(ended.stdout)}"
    alive = tmp_path / f"4567.tmp-{host}-{os.getpid()}"
    elsewhere = tmp_path / f"89ab.tmp-otherhost-{int(ended.stdout)}"
    for folder in (killed, alive, elsewhere):
        folder.mkdir()
        (folder / "domain-train.tokens").write_bytes(b"\0" * 64)
    assert remove_killed_writes(tmp_path) == [killed]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name])
