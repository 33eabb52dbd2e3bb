"""Packing computes what the documents compute alone; the data pipeline splits, caches and reports."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from batch import BatchGeometry
from data.dataset import prepare
from data.loader import DistributedBatchLoader, collate
from data.packing import pack
from data.tokens import Sequences
from fsdp.model import TrainableCausalLM, build_model
from tests.helpers import DEFAULT_MODEL, ragged_examples, tiny_config

pytestmark = pytest.mark.fast  # every test here runs in this process: the fast tier (make test-fast)


def packed(docs: list[dict], max_seq_length: int) -> list[dict]:
    """Documents packed as the pipeline packs them (index arrays), read back as sequences."""
    one_each = Sequences.from_examples(docs)
    starts = pack(one_each.lengths, max_seq_length)
    sequences = Sequences(one_each.parts, one_each.piece_part, one_each.piece_example, starts, packed=True)
    return [{k: v.tolist() for k, v in sequences.sequence(j).items()} for j in range(len(sequences))]


def test_pack_restarts_positions_and_never_splits_a_document():
    docs = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([3, 4, 2, 5, 1], start=1)]
    sequences = packed(docs, max_seq_length=7)
    assert [p["input_ids"] for p in sequences] == [[1, 1, 1, 2, 2, 2, 2], [3, 3, 4, 4, 4, 4, 4], [5]]
    assert sequences[0]["position_ids"] == [0, 1, 2, 0, 1, 2, 3]
    assert sequences[1]["position_ids"] == [0, 1, 0, 1, 2, 3, 4]
    assert sequences[0]["labels"] == [1, 1, 1, 2, 2, 2, 2]
    assert list(pack(np.array([3, 4, 2, 5, 1]), 7)) == [0, 2, 4, 5]
    with pytest.raises(ValueError, match="longer than max_seq_length=4"):
        pack(np.array([3, 4, 2, 5, 1]), max_seq_length=4)


def test_packed_sequence_loss_equals_separate_documents():
    torch.manual_seed(0)
    model = TrainableCausalLM(build_model(tiny_config(), torch.float32, on_meta=False, seed=0)).eval()
    docs = ragged_examples(4, min_len=5, max_len=12, seed=2)
    with torch.no_grad():
        separate = sum(model(**_inputs(collate([d], pad_id=0))).item() for d in docs)
        (sequence,) = packed(docs, max_seq_length=64)
        batch = collate([sequence], pad_id=0)
        together = model(**_inputs(batch)).item()
        # The same tokens with plain positions: attention now crosses documents, and the loss moves.
        crossing = model(batch.input_ids, None, batch.labels).item()
    assert together == pytest.approx(separate, rel=1e-5)
    assert abs(crossing - separate) > 1e-3 * separate


def _inputs(batch):
    return {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "labels": batch.labels}


def test_padding_of_a_packed_row_continues_its_last_document():
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "labels": [6, 7, 8], "position_ids": [0, 0, 1]},
            {"input_ids": [5, 6, 7, 8, 9], "labels": [6, 7, 8, 9, 1], "position_ids": [0, 1, 2, 0, 1]},
        ],
        pad_id=0,
    )
    assert batch.position_ids.tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 0, 1]]


def test_epoch_statistics_count_padding_and_targets():
    examples = [{"input_ids": [1] * n, "labels": [1] * (n - 1) + [-100]} for n in (2, 4, 6, 8)]
    loader = DistributedBatchLoader(examples, BatchGeometry(2, 1, 1, 8), rank=0, seed=0, pad_id=0)
    efficiency, targets = loader.epoch_statistics()
    order = loader._permutation(0)
    lengths = [[len(examples[i]["input_ids"]) for i in order[k : k + 2]] for k in (0, 2)]
    assert efficiency == pytest.approx(20 / sum(2 * max(pair) for pair in lengths))
    assert targets == pytest.approx(16 / 2)


def data_config(tmp_path, **overrides):
    base = OmegaConf.load("conf/config.yaml").data
    base.path = "data/samples/unit-conversions.jsonl"
    base.cache_dir = str(tmp_path / "cache")
    return OmegaConf.merge(base, overrides)


def test_prepare_splits_caches_and_reports(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    cfg = data_config(tmp_path, eval_fraction=0.1)
    first = prepare(cfg, tokenizer, 128, seed=0)
    assert (len(first.train), len(first.eval_sets["domain"])) == (720, 80)
    assert not first.cached and entries(tmp_path / "cache") == 1
    again = prepare(cfg, tokenizer, 128, seed=0)
    assert again.cached and examples(again.train) == examples(first.train)
    assert any(line.startswith("domain/train:   720 examples") for line in first.lines)
    # Train and eval split the records: together they are exactly the whole file.
    whole = prepare(data_config(tmp_path), tokenizer, 128, seed=0)
    assert whole.eval_sets == {}  # no held-out set is no set, not an empty one

    def counted(examples):
        return Counter(tuple(e["input_ids"]) for e in examples)

    assert counted(examples(first.train)) + counted(first.eval_sets["domain"]) == counted(
        examples(whole.train)
    )
    # A seeded subset of each: the same examples every time, in their order.
    capped = prepare(
        data_config(tmp_path, eval_fraction=0.1, max_train_examples=100),
        tokenizer,
        128,
        seed=0,
        max_eval_examples=30,
    )
    assert capped.cached and (len(capped.train), len(capped.eval_sets["domain"])) == (100, 30)
    assert counted(examples(capped.train)) <= counted(examples(first.train))
    assert counted(capped.eval_sets["domain"]) <= counted(first.eval_sets["domain"])
    again = prepare(
        data_config(tmp_path, eval_fraction=0.1, max_train_examples=100),
        tokenizer,
        128,
        seed=0,
        max_eval_examples=30,
    )
    assert examples(again.train) == examples(capped.train) and again.eval_sets == capped.eval_sets
    # Another setting is another cache entry; packing is applied after the cache.
    together = prepare(data_config(tmp_path, eval_fraction=0.1, packing=True), tokenizer, 128, seed=0)
    assert together.cached and len(together.train) < 720 and "position_ids" in together.train.sequence(0)
    prepare(data_config(tmp_path, eval_fraction=0.2), tokenizer, 128, seed=0)
    assert entries(tmp_path / "cache") == 3


def examples(sequences: Sequences) -> list[dict]:
    return [{k: v.tolist() for k, v in sequences.sequence(j).items()} for j in range(len(sequences))]


def entries(cache: Path) -> int:
    """Tokenized folders in a cache (beside them, the data files' digests)."""
    return sum(1 for entry in cache.iterdir() if entry.name != "digests")


def test_prepare_mixes_general_text(tmp_path):
    from transformers import AutoTokenizer

    general = tmp_path / "general.jsonl"
    general.write_text("\n".join(json.dumps({"text": f"General text number {i}. " * 20}) for i in range(30)))
    cfg = data_config(tmp_path, general={"fraction": 0.2, "path": str(general), "text_field": "text"})
    data = prepare(cfg, AutoTokenizer.from_pretrained(DEFAULT_MODEL), 256, seed=0)
    assert len(data.train) == 800 + 200  # 800 domain examples: 20% general means 200 drawn
    assert any(
        line.startswith("mixing: 800 domain + 200 general examples: general share 20.0%")
        for line in data.lines
    )
    # Mixing comes after the tokenized cache: another fraction re-uses it.
    cfg.general.fraction = 0.5
    more = prepare(cfg, AutoTokenizer.from_pretrained(DEFAULT_MODEL), 256, seed=0)
    assert more.cached and len(more.train) == 800 + 800


def test_replayed_answers_mix_in_as_instructions_and_the_unseen_set_is_evaluated_only(tmp_path):
    """data.general.format=prompt_response (self-replay): the answers are the targets, the questions
    masked; the general held-out set stays plain text; data.unseen.eval_path is a held-out set only."""
    from transformers import AutoTokenizer

    replay, text, unseen = (tmp_path / n for n in ("replay.jsonl", "general-eval.jsonl", "unseen.jsonl"))
    replay.write_text("\n".join(json.dumps({"prompt": f"Q{i}?", "response": f"A{i}."}) for i in range(10)))
    text.write_text(json.dumps({"text": "Held-out general prose. " * 10}))
    unseen.write_text("\n".join(json.dumps({"text": "Unseen prose. " * 100}) for _ in range(2)))
    general = {"fraction": 0.2, "path": str(replay), "format": "prompt_response", "eval_path": str(text)}
    cfg = data_config(tmp_path, general=general, unseen={"eval_path": str(unseen)})
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    data = prepare(cfg, tokenizer, 128, seed=0)
    replayed = [e for e in examples(data.train) if tokenizer.decode(e["input_ids"]).endswith(("A0.", "A3."))]
    assert len(data.train) == 800 + 200 and replayed  # drawn with replacement past 10
    first = next(i for i, label in enumerate(replayed[0]["labels"]) if label != -100)
    assert tokenizer.decode(replayed[0]["input_ids"][: first + 1]).endswith("assistant\n")  # question masked
    assert set(data.eval_sets) == {"general", "unseen"}  # no domain held-out set here
    assert all(-100 not in e["labels"] for e in data.eval_sets["general"])  # text: every token a target
    unseen_tokens = len(tokenizer(("Unseen prose. " * 100).rstrip(), add_special_tokens=False)["input_ids"])
    # Cut into 128-token windows, every token of both records a target (plus each one's end token).
    assert sum(len(e["labels"]) for e in data.eval_sets["unseen"]) >= 2 * unseen_tokens


def test_nothing_left_to_train_on_is_an_error(tmp_path):
    from transformers import AutoTokenizer

    # At 20 positions every prompt is cut before its response: no example has a target.
    with pytest.raises(
        ValueError, match=r"data.path=data/samples/unit-conversions.jsonl: no example left to train on"
    ):
        prepare(data_config(tmp_path), AutoTokenizer.from_pretrained(DEFAULT_MODEL), 20, seed=0)


def test_empty_eval_split_names_the_eval_file(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    long = tmp_path / "long-eval.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 300, "response": "yes"}) + "\n")
    # Every held-out record is longer than 128 positions and too_long=drop: nothing to evaluate.
    with pytest.raises(
        ValueError, match=rf"data.eval_path={long}: no example left to evaluate on \(0 examples"
    ):
        prepare(data_config(tmp_path, eval_path=str(long), too_long="drop"), tokenizer, 128, seed=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=rf"data.eval_path={empty}: no records \(empty file\)"):
        prepare(data_config(tmp_path, eval_path=str(empty)), tokenizer, 128, seed=0)


def test_every_data_group_composes():
    from config import group_options, load_config

    formats = {name: load_config([f"data={name}"]).data.format for name in group_options("data")}
    assert formats == {
        "chat": "chat",
        "hub": "prompt_response",
        "jsonl": "prompt_response",
        "medical": "prompt_response",
        "sample": "prompt_response",
        "text": "text",
    }
