"""Prompt masking, padding, and the distributed loader's global batch order."""

from __future__ import annotations

import json

import pytest
import torch

from batch import BatchGeometry
from data.loader import DistributedBatchLoader, collate
from data.sft import encode_chat, encode_prompt_response, encode_records
from data.sources import load_records
from tests.helpers import DEFAULT_MODEL, ragged_examples


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.mark.fast
def test_prompt_tokens_are_masked_exactly(tokenizer):
    e = encode_prompt_response(tokenizer, "Convert 5 miles to kilometres.", "5 miles is 8.05 kilometres.")
    # 37 tokens of chat-templated prompt (system, user, assistant header), 10 of response, then EOS.
    assert len(e["input_ids"]) == 47 and len(e["labels"]) == 47
    targets = [i for i, label in enumerate(e["labels"]) if label != -100]
    assert targets == list(
        range(36, 47)
    )  # position 36 (the header's last token) predicts the first answer token
    assert e["labels"][36:] == [37, 4158, 314, 216, 40, 30, 32, 37, 18541, 30, 2]
    assert e["labels"][-1] == tokenizer.eos_token_id
    assert all(e["input_ids"][t + 1] == e["labels"][t] for t in range(36, 46))  # shifted by one


@pytest.mark.fast
def test_chat_masks_everything_but_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    e = encode_chat(tokenizer, messages)
    targets = [label for label in e["labels"] if label != -100]
    # Each assistant turn: its content, <|im_end|> (id 2) and the template's newline (id 198).
    assert tokenizer.decode(targets) == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"
    assert [i for i, label in enumerate(e["labels"]) if label != -100] == [17, 18, 19, 20, 32, 33, 34, 35, 36]
    assert len(e["input_ids"]) == 37


@pytest.mark.fast
def test_train_on_prompt_makes_every_token_a_target(tokenizer):
    record = {"prompt": "Convert 5 miles to kilometres.", "response": "5 miles is 8.05 kilometres."}
    (e,), _ = encode_records(tokenizer, [record], "prompt_response", 256, train_on_prompt=True)
    assert e["labels"] == [*e["input_ids"][1:], tokenizer.eos_token_id]
    chat = encode_chat(
        tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], True
    )
    assert -100 not in chat["labels"]


@pytest.mark.fast
def test_chat_without_a_template_is_refused(tokenizer):
    from copy import copy

    plain = copy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match=r"data.format=chat: the tokenizer of .* has no chat template"):
        encode_chat(plain, [{"role": "user", "content": "Hi"}])


@pytest.mark.fast
def test_too_long_is_truncated_or_dropped_and_counted(tokenizer):
    record = {"prompt": "Convert 5 miles to kilometres.", "response": "5 miles is 8.05 kilometres."}
    (cut,), report = encode_records(tokenizer, [record], "prompt_response", 40)
    assert len(cut["input_ids"]) == 40 and report.truncated == 1
    assert sum(label != -100 for label in cut["labels"]) == 4
    examples, report = encode_records(tokenizer, [record] * 2, "prompt_response", 40, too_long="drop")
    assert examples == [] and report.dropped_too_long == 2
    # The prompt alone fills 36 positions: nothing left to learn, dropped and counted.
    _, report = encode_records(tokenizer, [record] * 3, "prompt_response", 36)
    assert (report.examples, report.dropped_no_target, report.truncated) == (0, 3, 3)


@pytest.mark.fast
def test_collate_pads_right_with_ignored_labels():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [6, 7, 8]}, {"input_ids": [9], "labels": [-100]}], pad_id=0
    )
    assert batch.input_ids.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch.labels.tolist() == [[6, 7, 8], [-100, -100, -100]]
    assert batch.position_ids is None  # unpacked: the model counts positions itself
    assert (batch.num_target_tokens, batch.num_tokens) == (3, 4)


def global_batches(world_size: int, micro: int, steps: int) -> list[list[list[int]]]:
    examples = [{"input_ids": [i], "labels": [i]} for i in range(40)]
    accum = 8 // (micro * world_size)
    loaders = [
        DistributedBatchLoader(examples, BatchGeometry(micro, accum, world_size, 8), rank, seed=3, pad_id=0)
        for rank in range(world_size)
    ]
    out = []
    for _ in range(steps):
        per_rank = [[b.input_ids[:, 0].tolist() for b in loader.next_step()] for loader in loaders]
        out.append(per_rank)
    return out


@pytest.mark.fast
def test_global_batches_do_not_depend_on_world_size():
    def as_sets(batches):
        return [sorted(i for rank in step for micro in rank for i in micro) for step in batches]

    one = global_batches(1, 8, 12)
    assert as_sets(global_batches(2, 2, 12)) == as_sets(one) == as_sets(global_batches(4, 1, 12))
    two = global_batches(2, 2, 5)
    for step in two:  # ranks see disjoint slices
        rank0, rank1 = ({i for micro in rank for i in micro} for rank in step)
        assert not rank0 & rank1
    # 40 examples = 5 steps an epoch; the next epoch is a different permutation of all of them.
    epochs = as_sets(one)
    first, second = ([i for step in epochs[e : e + 5] for i in step] for e in (0, 5))
    assert sorted(first) == list(range(40)) == sorted(second)
    assert epochs[:5] != epochs[5:10]


@pytest.mark.fast
def test_every_micro_batch_carries_its_steps_totals_over_every_rank():
    # The loss denominator, known on the host: what an all-reduce of every rank's counts would give.
    examples = ragged_examples(48)
    loaders = [
        DistributedBatchLoader(examples, BatchGeometry(2, 3, 2, 64), r, seed=5, pad_id=0) for r in (0, 1)
    ]
    for _ in range(4):
        steps = [loader.next_step() for loader in loaders]
        targets = sum(b.num_target_tokens for rank in steps for b in rank)
        tokens = sum(b.num_tokens for rank in steps for b in rank)
        assert {b.step_totals for rank in steps for b in rank} == {(targets, tokens)}
        assert targets > 0


@pytest.mark.fast
def test_loader_state_round_trip():
    examples = ragged_examples(40)
    geometry = BatchGeometry(2, 2, 1, 64)
    a = DistributedBatchLoader(examples, geometry, 0, seed=1, pad_id=0)
    for _ in range(13):
        a.next_step()
    b = DistributedBatchLoader(examples, geometry, 0, seed=1, pad_id=0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_step()[1].input_ids, b.next_step()[1].input_ids)


@pytest.mark.fast
def test_too_few_examples_for_one_global_batch():
    with pytest.raises(ValueError, match="3 examples do not fill one global batch of 8 sequences"):
        DistributedBatchLoader(ragged_examples(3), BatchGeometry(2, 2, 2, 64), 0, seed=0, pad_id=0)


FIELDS = {"prompt": "prompt", "response": "response", "messages": "messages", "text": "text"}


@pytest.mark.fast
def test_sources_name_the_missing_field_the_bad_line_and_the_empty_file(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(
        ValueError, match=r"data.prompt_field=prompt: no such field .* fields found: question, answer"
    ):
        load_records(str(good), "prompt_response", FIELDS)
    renamed = {**FIELDS, "prompt": "question", "response": "answer"}
    assert load_records(str(good), "prompt_response", renamed) == [{"prompt": "q", "response": "a"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response": "a"}\n\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"data.path=.*bad.jsonl line 3: not valid JSON \(Expecting value\)"):
        load_records(str(bad), "prompt_response", FIELDS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"data.path=.*empty.jsonl: no records"):
        load_records(str(empty), "prompt_response", FIELDS)
    with pytest.raises(FileNotFoundError, match=r"data.general.path=.*nope.jsonl: no such file"):
        load_records(str(tmp_path / "nope.jsonl"), "text", FIELDS, key="data.general.path")
    parquet = tmp_path / "t.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one doc", "two docs"]}), parquet)
    assert load_records(str(parquet), "text", FIELDS) == [{"text": "one doc"}, {"text": "two docs"}]


@pytest.mark.fast
def test_a_folder_of_files_is_one_source(tmp_path):
    folder = tmp_path / "records"
    (folder / "b").mkdir(parents=True)
    (folder / "a.jsonl").write_text(json.dumps({"prompt": "1", "response": "x"}) + "\n")
    (folder / "b" / "c.jsonl").write_text(json.dumps({"prompt": "2", "response": "y"}) + "\n")
    (folder / "notes.md").write_text("ignored")
    records = load_records(str(folder), "prompt_response", FIELDS)
    assert records == [{"prompt": "1", "response": "x"}, {"prompt": "2", "response": "y"}]
    (folder / "d.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"the folder mixes file types \(json, parquet\)"):
        load_records(str(folder), "prompt_response", FIELDS)
    with pytest.raises(ValueError, match="the folder holds no"):
        load_records(str(_empty(tmp_path)), "text", FIELDS)


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_parallel_tokenizing_never_forks_this_process(tokenizer, monkeypatch, tmp_path):
    """The pool comes from a fork server (a fresh interpreter), never a fork of this process, which
    holds the process group's (and NCCL's) threads by then; the arrays equal one process's."""
    import multiprocessing as mp

    from omegaconf import OmegaConf

    from data.dataset import prepare

    records = tmp_path / "records.jsonl"
    records.write_text(
        "".join(
            json.dumps({"prompt": f"Convert {i} metres to feet.", "response": f"{i * 3.28084:.2f} feet"})
            + "\n"
            for i in range(5000)
        )
    )
    methods = []
    original = mp.get_context
    monkeypatch.setattr(mp, "get_context", lambda method=None: methods.append(method) or original(method))
    results = {}
    for num_proc in (2, 1):
        cfg = OmegaConf.load("conf/config.yaml").data
        cfg.path, cfg.num_proc, cfg.cache_dir = str(records), num_proc, str(tmp_path / f"cache-{num_proc}")
        data = prepare(cfg, tokenizer, 64, seed=0, progress=False)
        arrays = {
            name: (data.folder / f"domain-train.{name}").read_bytes()
            for name in ("tokens", "targets", "offsets")
        }
        results[num_proc] = (arrays, data.meta["parts"]["domain/train"]["report"])
    assert methods == ["forkserver"]
    assert results[2] == results[1] and results[2][1]["examples"] == 5000
