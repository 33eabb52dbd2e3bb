"""make bench-data's harness once, small: the real script on a few hundred of the default task's
records and a few tiny chats, through prepare.py twice, the tokenizer's own speed and the chat
sets; its numbers are there and sane, and its results name the CPU.

The train.py start (2 ranks, one step) is left out of the run here (`--skip-train`: it would
double this test); its parts are checked apart: the banner it parses, made by train.py's own
banner functions, and its arguments, which must compose and validate as a 2-rank run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import REPO

SOURCE = Path(REPO) / ".cache" / "data" / "medical-terms" / "train.jsonl"
# The default task's records only: the general and held-out files are the same at every scale.
DOMAIN_ONLY = (
    "data.general.fraction=0",
    "data.general.path=null",
    "data.general.eval_path=null",
    "data.unseen.eval_path=null",
    "data.eval_path=null",
)


@pytest.mark.skipif(not SOURCE.is_file(), reason="make data builds the default task")
def test_bench_data_measures_prepare_cache_and_chat(tmp_path):
    out = tmp_path / "results"
    command = [
        sys.executable,
        "bench/data_scale.py",
        "--records",
        "300",
        "--scales",
        "1",
        "--chat-records",
        "32",
    ]
    command += ["--sample", "300", "--skip-train", "--work", str(tmp_path / "work"), "--out", str(out)]
    command += [arg for o in DOMAIN_ONLY for arg in ("--set", o)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    (record_file,) = out.glob("data-*.json")
    record = json.loads(record_file.read_text())
    table = (out / "data.md").read_text()
    import torch

    from fsdp.precision import this_cpu

    assert record["machine"]["cpu"] == this_cpu().name and this_cpu().name in table
    assert record["machine"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert table in done.stdout

    (scale,) = record["scales"]
    assert scale["copies"] == 1 and scale["records"] == 300
    assert scale["examples"]["domain/train"] == 300  # nothing dropped, nothing else encoded
    assert scale["tokens"] > 300 * 20 and scale["tokens_per_s"] > 0 and scale["num_proc"] >= 1
    assert scale["tokenizer"]["tokens_per_s"] > 0 and scale["tokenizer"]["records"] == 300
    assert 0 < scale["efficiency"] <= 1.5  # of one thread per process; more would be a bad measurement
    assert scale["cached"]["already_prepared"] and not scale["prepare"]["already_prepared"]
    # At 300 records both runs are mostly interpreter start-up, so the test does not compare their
    # times (the bench does, at the sizes users bring); it checks that both were measured.
    assert scale["cached"]["wall_s"] > 0 and scale["prepare"]["wall_s"] > 0
    assert scale["cached"]["in_process_s"] >= 0 and scale["prepare"]["in_process_s"] > 0
    assert 2 < scale["bytes_per_token"] < 10
    assert scale["prepare"]["max_rss_bytes"] > 2**26  # a Python process with torch: well over 64 MiB
    assert scale["train"] is None
    assert not (tmp_path / "work" / "scale-1x").exists()  # removed without --keep

    chat = record["chat"]
    assert chat["4-turn"]["conversations"] == 32 and chat["16-turn"]["conversations"] == 8
    assert chat["4-turn"]["examples"] == {"domain/train": 32}
    # The same pairs either way: only the template's text per conversation differs.
    assert chat["16-turn"]["tokens"] == pytest.approx(chat["4-turn"]["tokens"], rel=0.15)
    assert chat["ratio"] > 0 and all(chat[n]["tokens_per_s"] > 0 for n in ("4-turn", "16-turn"))

    names = [t["target"] for t in record["targets"]]
    assert len(names) == 4 and not any("memory" in n for n in names)  # no train start, no peaks
    assert all(
        isinstance(t["pass"], bool) and "1x" in t["at"] for t in record["targets"] if t["at"] != "chat"
    )
    assert sum(line.startswith(("- PASS ", "- FAIL ")) for line in table.splitlines()) == 4


@pytest.mark.fast
def test_banner_parsing_reads_train_py_banner():
    from bench.data_scale import BenchFailed, parse_banner
    from config.banner import data_lines, loading_line

    cfg = SimpleNamespace(data=SimpleNamespace(path="x.jsonl", format="prompt_response"))
    loader = SimpleNamespace(epoch_statistics=lambda: (0.75, 1234.0))
    hit = SimpleNamespace(seconds=0.43, cached=True, lines=["packing: 3 examples -> 2 sequences"])
    banner = "\n".join(
        ["=" * 78, *data_lines(cfg, hit, loader), loading_line(2.5, [int(0.44 * 2**30), 3 * 2**29])]
    )
    assert parse_banner(banner) == {
        "data_s": 0.4,
        "from_cache": True,
        "load_s": 2.5,
        "load_peak_gib_per_rank": [0.44, 1.5],
    }
    missed = SimpleNamespace(seconds=12.0, cached=False, lines=[])
    banner = "\n".join([*data_lines(cfg, missed, loader), loading_line(1.0, [2**30])])
    assert parse_banner(banner)["from_cache"] is False and parse_banner(banner)["data_s"] == 12.0
    with pytest.raises(BenchFailed, match="no loading line"):
        parse_banner("\n".join(data_lines(cfg, missed, loader)))


@pytest.mark.fast
@pytest.mark.skipif(not SOURCE.is_file(), reason="make data builds the default task")
def test_train_start_arguments_make_a_valid_two_rank_run(tmp_path):
    import config
    from bench.data_scale import SCALE_PRESET, parse_arguments, train_overrides

    argv = train_overrides([*SCALE_PRESET, f"data.path={SOURCE}"], tmp_path / "cache", tmp_path / "run")
    cfg = config.load_config(argv)
    config.validate(cfg, 2)
    assert cfg.train.max_steps == 1 and list(cfg.eval.sets) == [] and cfg.eval.own_answers.prompts is None
    assert not cfg.export.enabled and not cfg.checkpoint.at_end and cfg.data.packing
    with pytest.raises(SystemExit):
        parse_arguments(["--chat-records", "6"])
    with pytest.raises(SystemExit):
        parse_arguments(["--scales", "1,0"])
