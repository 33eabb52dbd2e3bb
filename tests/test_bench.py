"""make bench's harness once, small: two sides run, and the results are valid JSON and a table that
name the CPU and the precision. (bench/levers.py, make bench-levers, runs the same run_fulltune on
each lever; its own test cost 40 s a suite and was let go: make bench-levers is its check.)

The benchmarks themselves (SmolLM2-135M, several repeats) are `make bench` and bench/levers.py, not
tests; here a tiny random Llama saved as a Hugging Face folder stands in for the model, 2 steps,
1 repeat.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DEFAULT_MODEL, REPO, tiny_config


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer

    from fsdp.model import build_model

    folder = tmp_path_factory.mktemp("bench") / "tiny-model"
    build_model(tiny_config(vocab_size=49152), torch.float32, on_meta=False, seed=0).save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEFAULT_MODEL).save_pretrained(folder)
    return folder


def run_script(script: str, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def assert_names_host(record: dict, markdown: str) -> None:
    """The record and the table name this CPU, its capability and the precision `auto` picks here."""
    import torch

    from fsdp.precision import choose_precision, this_cpu

    used, reason = choose_precision("auto", "cpu")
    assert record["precision"] == {"requested": "auto", "used": used, "reason": reason}
    assert record["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["cpu"]["bf16_native"] == this_cpu().bf16_native
    assert record["cpu"]["describe"] == this_cpu().describe()
    assert f"CPU: {this_cpu().describe()}" in markdown
    assert f"Precision on every run: **{used}**. Why: {reason}." in markdown


def test_bench_harness_runs_its_sides_and_writes_results(tmp_path, tiny_folder):
    """Two of the four sides, one process each: ours and the bare HF loop, on the same work. (Ours at
    N=2 and HF Trainer's side are make bench's alone: running them here would double this test.)"""
    out = tmp_path / "results"
    run_script(
        "bench/compare.py",
        *(
            "--repeats",
            "1",
            "--steps",
            "2",
            "--model",
            str(tiny_folder),
            "--sides",
            "fulltune N=1",
            "bare N=1",
        ),
        *("--out", str(out), "--work", str(tmp_path / "work"), "--set", "train.log_every=1"),
    )
    (record_file,) = out.glob("*.json")
    record = json.loads(record_file.read_text())
    table = (out / "results.md").read_text()
    assert_names_host(record, table)
    assert record["overrides"] == ["train.log_every=1"] and "with train.log_every=1" in table
    assert set(record["results"]) == {"fulltune N=1", "bare N=1"}
    for side, result in record["results"].items():
        (run,) = result["runs"]
        assert len(run["seconds"]) == len(run["tokens"]) == 2, side
        assert run["tokens_per_s"] > 0 and run["peak_rss_per_rank"] > 2**20, side
        assert run["tokens_per_s"] == pytest.approx(run["tokens"][1] / run["seconds"][1]), side
        assert run["first_step_s"] == run["seconds"][0], side
        assert 5 < run["last_loss"] < 15, side  # a random model: about log(49152) = 10.8
        assert len(run["peak_rss_bytes"]) == int(side[-1])
    # The same global batches: every side counts the same tokens in each step.
    tokens = {side: [round(t) for t in r["runs"][0]["tokens"]] for side, r in record["results"].items()}
    assert len(set(map(tuple, tokens.values()))) == 1, tokens
    # The same work at the same precision: after one update the two losses agree closely.
    losses = [r["last_loss"]["median"] for r in record["results"].values()]
    assert max(losses) - min(losses) < (0.05 if record["precision"]["used"] == "fp32" else 0.2), losses
    assert sum(line.startswith("| fulltune N=1 | bare N=1 |") for line in table.splitlines()) == 1
