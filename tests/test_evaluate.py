"""Evaluation and the forgetting report: distributed held-out loss, greedy answers, eval.json.

The distributed side runs on spawned gloo ranks (world size 2, fp32, a tiny random Llama); the
references are one process without FSDP: a loop over the examples, and Hugging Face's generate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import ragged_examples, run_distributed, tiny_config

EVAL = ragged_examples(13, seed=3)  # 13: the ranks' shares are uneven, and one runs out
PROMPTS = [[5, 17, 3, 99], [7, 8], [41, 42, 43, 44, 45, 46, 47]]
NEW_TOKENS = 8
STOP = {2}  # LlamaConfig's end-of-sequence token


def reference_eval(examples: list[dict] = EVAL) -> float:
    """Token-weighted mean loss, one example at a time, no FSDP, no padding."""
    from fsdp.model import TrainableCausalLM, build_model

    model = TrainableCausalLM(build_model(tiny_config(), torch.float32, on_meta=False, seed=0)).eval()
    total = targets = 0.0
    with torch.no_grad():
        for e in examples:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            total += model(ids, None, labels).double().item()
            targets += sum(label != -100 for label in e["labels"])
    return total / targets


def reference_generate() -> list[list[int]]:
    """Hugging Face's greedy generate on the whole model, left-padded like ours, cut at the stop token."""
    from fsdp.model import build_model

    model = build_model(tiny_config(), torch.float32, on_meta=False, seed=0).eval()
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=2,
    )
    answers = []
    for row in out[:, width:].tolist():
        answers.append(row[: row.index(2)] if 2 in row else row)
    return answers


def two_steps(d, precision: str, checkpointing: str, evaluate_between: bool) -> tuple:
    """Two training steps, with or without an evaluation and a generation between them."""
    from batch import BatchGeometry
    from data.loader import DistributedBatchLoader, eval_batches
    from fsdp.adamw import AdamW, param_groups
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.evaluate import evaluate
    from fsdp.generate import greedy_generate
    from fsdp.step import train_step

    model = build_sharded_model(
        tiny_config(), d, BuildSettings(precision=precision, checkpointing=checkpointing)
    )
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-3)
    loader = DistributedBatchLoader(
        ragged_examples(32, seed=1), BatchGeometry(2, 2, d.world_size, 64), d.rank, 0, 0
    )
    train_step(model, optimizer, loader.next_step(), 1.0)
    if evaluate_between:
        evaluate(model, eval_batches(EVAL, d.rank, d.world_size, 2, 0), d.device)
        greedy_generate(model, PROMPTS, max_new_tokens=3, stop_ids=STOP, pad_id=0, device=d.device)
    second = train_step(model, optimizer, loader.next_step(), 1.0)
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    return second.loss, second.grad_norm, params


def counted(calls: list, fn, *args, **kwargs):
    calls.append(1)
    return fn(*args, **kwargs)


def own_answers_twice(d, model, cache: Path) -> dict:
    """Two Evaluators with own answers and one 'before' cache: the first evaluates, generates and
    writes it; the second must read it, generating nothing."""
    from functools import partial

    from data.loader import eval_batches
    from data.sft import encode_answer
    from fsdp.evaluate import Evaluator, OwnAnswers
    from fsdp.generate import Generation
    from fsdp.metrics import MetricsLogger

    batches = partial(eval_batches, rank=d.rank, world_size=d.world_size, micro_batch_size=2, pad_id=0)
    out = {}
    for run in ("first", "second"):
        own = OwnAnswers(PROMPTS, NEW_TOKENS, encode_answer, batches)
        metrics = MetricsLogger(cache.parent / f"{run}-{d.rank}", d.rank == 0, 1)
        evaluator = Evaluator(
            model,
            sets={"held": batches(EVAL)},
            examples={"held": len(EVAL)},
            prompts=[],
            decode=str,
            generation=Generation(0, STOP, 0),
            every_steps=None,
            device=d.device,
            metrics=metrics,
            own_answers=own,
            before_cache=cache,
        )
        generated = []
        evaluator.generate = partial(counted, generated, evaluator.generate)
        evaluator.begin(0)
        metrics.close()
        out[run] = (evaluator.history, own.answers, evaluator.target_tokens, bool(generated))
    return out


class RankSkewed(torch.nn.Module):
    """The sharded model, except that rank 1's logits favour one token: two ranks that disagree."""

    def __init__(self, model, rank: int):
        super().__init__()
        self.inner, self.causal_lm, self.rank = model, model.causal_lm, rank

    def forward(self, *args, **kwargs):
        logits = self.inner(*args, **kwargs)
        if self.rank == 1:
            logits[..., 7] += 1e4
        return logits


def scenarios(d, cache: Path) -> dict:
    from torch.distributed.tensor import DTensor

    from data.loader import eval_batches
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.evaluate import evaluate
    from fsdp.generate import greedy_generate

    model = build_sharded_model(tiny_config(), d, BuildSettings(precision="fp32"))
    batches = eval_batches(EVAL, d.rank, d.world_size, 3, pad_id=0)
    result = evaluate(model, batches, d.device)
    generation = {"max_new_tokens": NEW_TOKENS, "stop_ids": STOP, "pad_id": 0, "device": d.device}
    out = {
        "loss": result.loss,
        "target_tokens": result.target_tokens,
        "batches": len(batches),
        "resharded": all(isinstance(p, DTensor) for p in model.parameters()),
        "training": model.training,
        "generated": greedy_generate(model, PROMPTS, **generation),
        "with stop": greedy_generate(model, PROMPTS, **generation, keep_stop=True),
        "skewed": greedy_generate(RankSkewed(model, d.rank), PROMPTS, **generation),
        "own answers": own_answers_twice(d, model, cache),
    }
    for precision, checkpointing in (("fp32", "none"), ("mixed", "full")):
        out[f"{precision}/{checkpointing}"] = [
            two_steps(d, precision, checkpointing, e) for e in (False, True)
        ]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_distributed(scenarios, 2, tmp_path_factory.mktemp("eval") / "before.json")


def test_eval_at_two_ranks_equals_one_process(two_ranks):
    expected = reference_eval()
    targets = sum(sum(label != -100 for label in e["labels"]) for e in EVAL)
    for rank in two_ranks:
        assert rank["batches"] == 3  # ceil(13 / (2 ranks x 3)): the same count on both ranks
        assert rank["target_tokens"] == targets
        assert rank["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert rank["resharded"] and rank["training"]  # back to the training layout and mode


def test_eval_leaves_training_untouched(two_ranks):
    for key in ("fp32/none", "mixed/full"):
        (loss, norm, params), (loss_e, norm_e, params_e) = two_ranks[0][key]
        assert (loss_e, norm_e) == (loss, norm), key  # exactly: the evaluation changed nothing
        assert all(torch.equal(params[n], params_e[n]) for n in params), key


def test_sharded_greedy_answers_equal_hf_generate(two_ranks):
    expected = reference_generate()
    assert two_ranks[0]["generated"] == two_ranks[1]["generated"] == expected
    assert any(len(a) == NEW_TOKENS for a in expected)  # at least one answer ran to the limit


def test_every_rank_answers_with_rank_0s_tokens(two_ranks):
    """Ranks whose logits disagree (rank 1's favour token 7) still hold one set of answers, rank
    0's: the own-answers reference and the answers written are the same on every rank."""
    assert two_ranks[0]["skewed"] == two_ranks[1]["skewed"] == two_ranks[0]["generated"]
    assert all(7 not in answer for answer in two_ranks[0]["generated"])


@pytest.mark.fast
def test_a_resumed_history_counts_only_for_the_same_sets():
    """A checkpoint's 'before' losses are kept only for sets with the same examples: a resume with
    other eval examples (another eval.max_examples, another file) starts its own 'before'."""
    from fsdp.evaluate import Evaluator
    from fsdp.generate import Generation

    def evaluator(keys: dict[str, str]) -> Evaluator:
        return Evaluator(
            None,
            sets={"domain": []},
            examples={"domain": 4},
            prompts=[],
            decode=str,
            generation=Generation(0, STOP, 0),
            every_steps=None,
            device=torch.device("cpu"),
            metrics=None,
            set_keys=keys,
        )

    saved = evaluator({"domain": "digest-a"})
    saved.history, saved.target_tokens = [{"step": 0, "domain": 2.5}], {"domain": 10}
    same, other = evaluator({"domain": "digest-a"}), evaluator({"domain": "digest-b"})
    same.load_state_dict(saved.state_dict())
    other.load_state_dict(saved.state_dict())
    assert same.history == saved.history and same.changed == []
    assert other.history == [] and other.changed == ["domain"]


def test_own_answers_drift_at_two_ranks_equals_one_process_and_is_kept_once(two_ranks):
    """The answers are Hugging Face's with the end token kept where it came; their loss is one process's on (prompt, answer) pairs within 1e-5; a second run with the
    same 'before' cache reads the losses and the answers, generating nothing."""
    from data.sft import encode_answer

    expected = [[*a, 2] if len(a) < NEW_TOKENS else a for a in reference_generate()]
    assert two_ranks[0]["with stop"] == two_ranks[1]["with stop"] == expected
    drift = reference_eval([encode_answer(p, a) for p, a in zip(PROMPTS, expected, strict=True)])
    for rank in two_ranks:
        history, answers, tokens, generated = rank["own answers"]["first"]
        assert answers == expected and generated
        assert history[0]["own_answers"] == pytest.approx(drift, abs=1e-5)
        assert history[0]["held"] == pytest.approx(reference_eval(), abs=1e-5)
        assert tokens["own_answers"] == sum(map(len, expected))  # every answer token a target
        assert rank["own answers"]["second"] == (history, answers, tokens, False)


@pytest.mark.fast
def test_eval_batches_cover_every_example_once():
    from data.loader import eval_batches

    pad = -1  # no token has this id, so a row's own tokens are the ones that are not it
    shares = [eval_batches(EVAL, r, 2, 3, pad_id=pad) for r in range(2)]
    assert [len(s) for s in shares] == [3, 3]  # 13 examples, 6 per global micro-batch: 3 rounds each
    rows = [
        tuple(t for t in row if t != pad)
        for s in shares
        for b in s
        if b.num_tokens
        for row in b.input_ids.tolist()
    ]
    assert sorted(rows) == sorted(tuple(e["input_ids"]) for e in EVAL)
    # Rank 1's last share is empty: a batch with no token and no target that still runs a forward.
    assert (shares[1][-1].num_tokens, shares[1][-1].num_target_tokens) == (0, 0)
    assert sum(b.num_target_tokens for s in shares for b in s) == sum(
        sum(label != -100 for label in e["labels"]) for e in EVAL
    )


@pytest.mark.fast
def test_forgetting_report_schema_and_summary():
    from fsdp.evaluate import forgetting_report, format_forgetting

    history = [
        {"step": 0, "domain": 2.5, "general": 3.0},
        {"step": 5, "domain": 2.2, "general": 3.1},
        {"step": 10, "domain": 2.0, "general": 3.25},
    ]
    report = forgetting_report(history, {"domain": 48, "general": 48}, {"domain": 2000, "general": 6000})
    assert set(report) == {
        "before_step",
        "after_step",
        "sets",
        "domain_gain",
        "forgetting",
        "forgetting_unseen",
        "own_answers_drift",
        "history",
    }
    assert (report["before_step"], report["after_step"]) == (0, 10)
    domain = report["sets"]["domain"]
    assert set(domain) == {
        "examples",
        "target_tokens",
        "loss_before",
        "loss_after",
        "change",
        "perplexity_before",
        "perplexity_after",
    }
    assert domain["change"] == pytest.approx(-0.5) and report["domain_gain"] == pytest.approx(0.5)
    assert report["forgetting"] == pytest.approx(0.25)
    assert domain["perplexity_after"] == pytest.approx(math.exp(2.0))
    text = format_forgetting(report)
    assert "domain gain:  +0.5000" in text and "general cost: +0.2500" in text
    assert "general cost per unit of domain gain: +0.500" in text
    assert report["forgetting_unseen"] is None and "unseen cost" not in text
    three = [{"step": 0, "general": 3.0, "unseen": 2.0, "own_answers": 0.5}] * 2
    three[1] = {"step": 4, "general": 2.9, "unseen": 2.1, "own_answers": 0.75}
    report = forgetting_report(three, dict.fromkeys(three[0], 8), dict.fromkeys(three[0], 99))
    assert report["forgetting_unseen"] == pytest.approx(0.1) and report["own_answers_drift"] == 0.25
    text = format_forgetting(report)
    assert "unseen cost:  +0.1000" in text and "own-answers drift: +0.2500" in text
    only_domain = forgetting_report(
        [{"step": 0, "domain": 2.0}, {"step": 3, "domain": 2.1}], {"domain": 4}, {"domain": 9}
    )
    assert only_domain["forgetting"] is None and only_domain["domain_gain"] == pytest.approx(-0.1)


@pytest.mark.fast
def test_forgetting_experiment_writes_table_plot_and_results(tmp_path):
    from experiments.forgetting import MEASURES, SETTINGS, write_results

    def row(name, *changes):
        before = dict(zip(MEASURES, (2.5, 3.0, 2.0, 0.5), strict=True))
        return {
            "setting": name,
            "steps": 10,
            **{
                m: {"loss_before": before[m], "loss_after": before[m] + c, "change": c}
                for m, c in zip(MEASURES, changes, strict=True)
            },
        }

    rows = [row("baseline", -0.5, -0.05, 0.01, 0.2), row("lr x10", -0.9, 0.25, 0.125, 1.0)]
    write_results(rows, tmp_path, "test machine")
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| setting | steps | domain | Wikipedia") and table[0].endswith("(drift) |")
    assert table[2] == "| before fine-tuning | 0 | 2.5000 | 3.0000 | 2.0000 | 0.5000 |"
    assert (
        table[3]
        == "| baseline | 10 | 2.0000 (-0.5000) | 2.9500 (-0.0500) | 2.0100 (+0.0100) | 0.7000 (+0.2000) |"
    )
    assert table[4].endswith("| 2.1250 (+0.1250) | 1.5000 (+1.0000) |")
    assert (tmp_path / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["settings"] == rows
    assert list(SETTINGS) == [
        "baseline",
        "no mixing",
        "lr x10",
        "3 epochs",
        "lr x10, no mixing",
        "self-replay",
    ]


@pytest.mark.fast
def test_self_replay_data_is_built_once_from_other_questions(tmp_path, monkeypatch):
    """experiments/self_replay.py: its questions are none of the drift's, the answers that ended are
    written as prompt/response records, and a second build with the same key reuses them."""
    from data.sources import read_questions
    from experiments import self_replay

    replay = read_questions(self_replay.QUESTIONS)
    drift = read_questions(self_replay.REPO / "data" / "samples" / "general-questions.txt")
    assert (len(replay), len(drift)) == (64, 32) and not set(replay) & set(drift)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calls = []

    def answer(folder, questions, max_new_tokens):
        calls.append(max_new_tokens)
        return [{"prompt": q, "response": "yes"} for q in questions[::2]]  # half of them ended

    monkeypatch.setattr(self_replay, "answer_questions", answer)
    out = tmp_path / "replay"
    first = self_replay.build(out, model, self_replay.QUESTIONS, 16)
    again = self_replay.build(out, model, self_replay.QUESTIONS, 16)
    assert calls == [16] and again == first and first["answers kept"] == 32
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert records[0] == {"prompt": replay[0], "response": "yes"} and len(records) == 32
    self_replay.build(out, model, self_replay.QUESTIONS, 24)  # another limit: built again
    assert calls == [16, 24]
