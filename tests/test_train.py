"""train.py end to end, as users run it: torchrun at world size 2 and plain python at world size 1."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from fsdp.metrics import read_metrics
from tests.helpers import losses, run

COMMON = ["preset=tiny", "precision=fp32", "optim.lr=2e-5", "batch.global_batch_size=8", "export.dtype=fp32"]
# Forgetting where mixing cannot flatter it: the unseen set and the drift from the model's own answers.
COMMON += [
    "data.unseen.eval_path=.cache/data/python-docs/eval.jsonl",
    "eval.own_answers.prompts=data/samples/general-questions.txt",
    "eval.own_answers.max_new_tokens=6",
]
SETS = ("domain", "unseen", "own_answers")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "two"
    result = run(
        [*COMMON, f"run_dir={run_dir}", "memory.track=true", "eval.every_steps=2", "comm.track=true"], nproc=2
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout


def test_torchrun_two_ranks_trains_and_exports(two_ranks):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, stdout = two_ranks
    assert "3,219,776 params" in stdout and "2 x cpu (gloo)" in stdout
    assert "2 seq/micro-batch x 2 accumulation x 2 ranks = 8 sequences" in stdout
    assert "peak host memory per rank: " in stdout
    assert stdout.count("fulltune  preset=tiny") == 1  # rank 0 alone prints
    assert len(losses(run_dir)) == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["peak_rss_bytes_per_rank"]) == 2 and summary["last_loss"] == losses(run_dir)[-1]
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "tensorboard").iterdir())
    assert f"model written to {run_dir / 'model'}" in stdout

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Convert 3 miles to kilometres."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5)


def test_memory_track_writes_each_ranks_ledger(two_ranks):
    run_dir, stdout = two_ranks
    record = json.loads((run_dir / "memory.json").read_text())
    assert len(record["ranks"]) == 2 and all(set(r) == {"step 1", "step 4"} for r in record["ranks"])
    analytic = record["analytic"]["categories"]
    for ledgers in record["ranks"]:
        for ledger in ledgers.values():
            measured = ledger["categories"]
            # fp32: 4 + 4 + 8 bytes per parameter over 2 ranks (no padding: every dim 0 is even)
            assert measured["sharded params"] == analytic["sharded params"] == 4 * 3_219_776 // 2
            assert measured["optimizer state"] == analytic["optimizer state"]
            assert ledger["peak"] == max(p["total"] for p in ledger["phases"].values()) > 0
            assert ledger["host peak RSS"] > measured["sharded params"]
    assert stdout.count("memory of rank 0 (GiB)") == 2 and "memory of rank 1" not in stdout
    rows = read_metrics(run_dir / "metrics.jsonl")
    rows = [r for r in rows if "train/loss" in r]
    assert all("memory/host peak RSS" in r for r in rows)
    assert [r["step"] for r in rows if "memory/sharded params" in r] == [1, 4]


def test_eval_before_and_after_writes_the_forgetting_report(two_ranks):
    run_dir, stdout = two_ranks
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/domain/loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # before the first step, every 2 and after the last
    report = json.loads((run_dir / "eval.json").read_text())
    assert tuple(report["sets"]) == SETS
    for name in SETS:  # TensorBoard's and metrics.jsonl's names, eval.json's before and after
        assert all(
            r[f"eval/{name}/perplexity"] == pytest.approx(math.exp(r[f"eval/{name}/loss"])) for r in evals
        )
        got = report["sets"][name]
        # The tiny preset: a seeded 32 held-out examples a set (10% of the 800 sample records held
        # out; 32 of the Python reference's 128-token windows); 32 questions answered.
        assert got["examples"] == 32 and got["target_tokens"] > 0
        assert (got["loss_before"], got["loss_after"]) == (
            evals[0][f"eval/{name}/loss"],
            evals[-1][f"eval/{name}/loss"],
        )
        assert got["change"] == pytest.approx(got["loss_after"] - got["loss_before"])
    # 128-token windows (a topic's last one shorter); at most 6 answer tokens for each of the 32
    # questions, the end token included where it came.
    tokens = {name: report["sets"][name]["target_tokens"] for name in SETS}
    assert 32 * 100 < tokens["unseen"] <= 32 * 128 and 32 <= tokens["own_answers"] <= 32 * 6
    domain = report["sets"]["domain"]
    assert report["forgetting"] is None and report["domain_gain"] == pytest.approx(-domain["change"])
    assert report["forgetting_unseen"] == report["sets"]["unseen"]["change"]
    assert report["own_answers_drift"] == report["sets"]["own_answers"]["change"]
    assert "forgetting report: held-out loss before step 1 and after step 4" in stdout
    assert "own answers to 32 questions kept before step 1" in stdout and "own-answers drift: " in stdout
    # 2 sample prompts and 4 general ones, answered by rank 0's copy of the sharded model.
    answers = json.loads((run_dir / "generations.json").read_text())
    assert [a["set"] for a in answers] == ["domain"] * 2 + ["general"] * 4
    assert all(set(a) == {"set", "prompt", "before", "after"} for a in answers)
    table = (run_dir / "generations.md").read_text()
    assert "| set | prompt | before (step 0) | after (step 4) |" in table and table.count("\n| ") == 7


def test_comm_track_and_throughput_are_logged_every_step(two_ranks):
    run_dir, stdout = two_ranks
    lines = [line for line in stdout.splitlines() if line.startswith("comm step")]
    assert len(lines) == 4
    for line in lines:
        # Each kind's measured MiB equals its theory (fsdp/comm.py), printed side by side.
        for kind in ("all-gather", "reduce-scatter"):
            measured, theory = re.search(
                rf"{kind} ([\d.,]+) MiB in \d+ calls, theory ([\d.,]+)", line
            ).groups()
            assert measured == theory
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "train/loss" in r]
    for r in steps:
        assert r["comm/all-gather bytes"] > 0 and r["comm/reduce-scatter calls"] == 3  # root + 2 layers, once
        assert r["perf/model_tflops_per_rank"] > 0 and "perf/mfu" not in r  # a CPU has no known peak
        assert r["perf/hardware_tflops_per_rank"] >= r["perf/model_tflops_per_rank"]
        assert all(r[f"time/{p}_s"] > 0 for p in ("forward", "backward", "optimizer", "comm"))
    assert "GFLOP per token at 128 tokens" in stdout


def test_one_process_matches_two_ranks(two_ranks, tmp_path):
    run_dir, _ = two_ranks
    result = run([*COMMON, f"run_dir={tmp_path / 'one'}"], nproc=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 accumulation x 1 ranks = 8 sequences" in result.stdout
    one, two = losses(tmp_path / "one"), losses(run_dir)
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5
    # Evaluation too: the same held-out losses and own-answers drift before and after, whatever the
    # world size.
    one_eval = json.loads((tmp_path / "one" / "eval.json").read_text())["sets"]
    two_eval = json.loads((run_dir / "eval.json").read_text())["sets"]
    for name in SETS:
        assert one_eval[name]["target_tokens"] == two_eval[name]["target_tokens"], name
        for key in ("loss_before", "loss_after"):
            assert two_eval[name][key] == pytest.approx(one_eval[name][key], abs=1e-5), (name, key)
    a = AutoModel(tmp_path / "one" / "model")
    b = AutoModel(run_dir / "model")
    assert (
        max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters(), strict=True)) <= 1e-4
    )


def test_bf16_adamw_state_learns_as_the_fp32_state_with_4_bytes_per_param_less(two_ranks, tmp_path):
    """optim.state_dtype=bf16 through train.py, beside the fp32-state run of the fixture: the banner,
    the ledger of steps 1 and 4, and the losses."""
    fp32_dir, _ = two_ranks
    run_dir = tmp_path / "bf16-state"
    quick = ["eval.sets=[]", "eval.own_answers.prompts=null", "eval.max_new_tokens=0", "export.enabled=false"]
    quick += ["checkpoint.at_end=false"]
    result = run(
        [*COMMON, f"run_dir={run_dir}", "optim.state_dtype=bf16", "memory.track=true", *quick], nproc=2
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer state   4 bytes/param -> 0.01 GiB per rank (m and v in bf16: optim.state_dtype)" in (
        result.stdout
    )
    local, tensors = 3_219_776 // 2, 2 * 9 + 2  # no padding at 2 ranks; 9 tensors a layer, embedding, norm
    bf16 = json.loads((run_dir / "memory.json").read_text())
    fp32 = json.loads((fp32_dir / "memory.json").read_text())
    assert bf16["analytic"]["categories"]["optimizer state"] == 2 * 2 * local + 4 * tensors
    assert fp32["analytic"]["categories"]["optimizer state"] == 2 * 4 * local + 4 * tensors
    for ledgers in bf16["ranks"]:
        for ledger in ledgers.values():
            assert ledger["categories"]["optimizer state"] == 2 * 2 * local + 4 * tensors
    # Step 1's loss precedes any update, step 2's follows the first, which runs on m and v before
    # they are stored: both are the fp32 run's bit for bit. Later updates run on the stored,
    # rounded moments: the weights part by about 2^-8 of how far they moved (2^-7 bounds it in
    # tests/test_adamw.py), so the losses by 2^-7 of what the updates changed the loss at most (the
    # fp32 run's held-out loss fell by 0.0097; measured: 1.1e-6 at step 3, 0 elsewhere, bound 7.6e-5).
    same, rounded = losses(fp32_dir), losses(run_dir)
    assert rounded[:2] == same[:2] and len(rounded) == len(same) == 4
    change = json.loads((fp32_dir / "eval.json").read_text())["sets"]["domain"]["change"]
    assert max(abs(a - b) for a, b in zip(rounded, same, strict=True)) <= 2**-7 * abs(change)


def AutoModel(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_config_error_from_torchrun_is_one_line(tmp_path):
    result = run(["preset=tiny", "optim.lr=0", f"run_dir={tmp_path / 'x'}"], nproc=2)
    assert result.returncode != 0
    assert result.stderr.count("config error: optim.lr=0: must be > 0") == 1
    assert not (tmp_path / "x").exists()


def test_bad_data_is_one_line_before_the_model_is_built(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a" "response": "b"}\n')
    result = run(["preset=tiny", "data=jsonl", f"data.path={bad}", f"run_dir={tmp_path / 'r'}"], nproc=None)
    assert result.returncode == 2
    assert f"data error: data.path={bad} line 2: not valid JSON (Expecting ',' delimiter)" in result.stderr
    assert "fulltune  preset=tiny" not in result.stdout  # stopped before the model and the banner
    assert not (tmp_path / "r").exists()  # and before the run folder: a corrected rerun is not refused


def test_memory_track_with_the_root_levers_equals_the_fake_step(tmp_path):
    """train.py with memory.track=true at 2 ranks, on an untied model, with the levers that change
    how the root unit is gathered and reduced (split root, no resharding, reducing every
    micro-batch) beside selective checkpointing with activation offload, AdamW foreach and bf16
    moments: both tracked steps' ledgers equal, category by category, the fake step of the same
    config (estimate.py's), in every category a batch does not change (the model state, gathered
    and reduced; the reduce-scatter buffers raised by ATen's CPU upcast of the largest unit, as in
    tests/test_memory.py)."""
    from config import settings
    from fsdp.memory import ModelShape
    from fsdp.memory.analytic import UnitSizes
    from fsdp.memory.levers import LEVERS_BY_KEY
    from fsdp.memory.measure import measure_step_on_fake_tensors

    keys = ("split-root", "no-resharding", "reduce-every-micro-batch", "ac-selective-activation-offload")
    keys += ("adamw-foreach", "bf16-moments")
    levers = ["precision=mixed", "+model.config_overrides.tie_word_embeddings=false"]
    levers += [override for key in keys for override in LEVERS_BY_KEY[key].overrides]
    run_dir = tmp_path / "levers"
    quick = ["eval.sets=[]", "eval.own_answers.prompts=null", "eval.max_new_tokens=0", "export.enabled=false"]
    quick += ["checkpoint.at_end=false", "train.max_steps=2"]
    result = run([*COMMON, *levers, f"run_dir={run_dir}", "memory.track=true", *quick], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    _, hf_config, w = settings.studied_run(["preset=tiny", *levers, "memory.world_size=2"])
    assert not hf_config.tie_word_embeddings and w.split_root and not w.reshard_after_forward
    fake = measure_step_on_fake_tensors(hf_config, w)["categories"]
    sizes = UnitSizes.of(ModelShape.from_hf_config(hf_config), 2, split_root=True)
    fake["reduce-scatter buffers"] += 4 * max(sizes.largest_root_part, sizes.layer)  # fp32 reductions
    record = json.loads((run_dir / "memory.json").read_text())
    batch_free = ("sharded params", "unsharded params", "sharded grads", "unsharded grads", "optimizer state")
    batch_free += ("all-gather buffers", "reduce-scatter buffers", "buffers")
    for ledgers in record["ranks"]:
        assert set(ledgers) == {"step 1", "step 2"}
        for ledger in ledgers.values():
            for category in batch_free:
                assert ledger["categories"][category] == fake[category], category
