"""make bench's harness, once, small: every side runs, and the results are valid JSON and a table.

The benchmark itself (SmolLM2-135M, 3 repeats) is `make bench`, not a test; here a tiny random
Llama saved as a Hugging Face folder stands in for the model, 2 steps, 1 repeat.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import DEFAULT_MODEL, REPO, tiny_config


def test_bench_harness_runs_every_side_and_writes_results(tmp_path):
    import torch
    from transformers import AutoTokenizer

    from fsdp.model import build_model

    folder = tmp_path / "tiny-model"
    build_model(tiny_config(vocab_size=49152), torch.float32, on_meta=False, seed=0).save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEFAULT_MODEL).save_pretrained(folder)
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            "bench/compare.py",
            "--repeats",
            "1",
            "--steps",
            "2",
            "--model",
            str(folder),
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (record_file,) = out.glob("*.json")
    record = json.loads(record_file.read_text())
    assert set(record["results"]) == {"fulltune N=2", "trainer N=2", "fulltune N=1", "bare N=1"}
    for side, result in record["results"].items():
        (run,) = result["runs"]
        assert len(run["seconds"]) == len(run["tokens"]) == 2, side
        assert run["tokens_per_s"] > 0 and run["peak_rss_per_rank"] > 2**20, side
        assert 5 < run["last_loss"] < 15, side  # a random model: about log(49152) = 10.8
        assert len(run["peak_rss_bytes"]) == int(side[-1])
    # The same global batches: every side counts the same tokens in each step.
    tokens = {side: [round(t) for t in r["runs"][0]["tokens"]] for side, r in record["results"].items()}
    assert len(set(map(tuple, tokens.values()))) == 1, tokens
    table = (out / "results.md").read_text()
    assert sum(line.startswith("| fulltune N=") for line in table.splitlines()) == 3
