"""Checkpoints and resume, end to end: runs killed on purpose (fsdp/faults.py), then resumed.

Every run is the tiny preset in fp32 on CPU, 6 optimizer steps of 2 micro-batches each, a
checkpoint after every step. The uninterrupted run is the reference: a resumed run must log the
same per-step losses (fp32 on CPU: identical) and end with the same model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time

import pytest
import torch

from experiments.chaos import (
    chaos,
    compare,
    descendants,
    kill_window,
    launch,
    summarize,
    timeline,
    train_rows,
    wait_gone,
)
from fsdp.metrics import read_metrics
from tests.helpers import fault, losses, node_checkouts, readme_command, run, run_nodes

STEPS = 6
COMMON = [
    "preset=tiny",
    "precision=fp32",
    "optim.lr=2e-3",
    "batch.global_batch_size=8",
    f"train.max_steps={STEPS}",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=null",
    "eval.every_steps=2",
]


def ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ckpt") / "reference"
    ok(run([*COMMON, f"run_dir={run_dir}"], nproc=2))
    assert len(losses(run_dir)) == STEPS
    return run_dir


@pytest.fixture(scope="module")
def reference_mixed(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ckpt") / "reference-mixed"
    ok(run([*MIXED, f"run_dir={run_dir}"], nproc=2))
    return run_dir


# Mixed precision computes in bf16, emulated (slow) on CPUs without native bf16: 3 steps, evaluated
# before and after only.
MIXED = [*COMMON, "precision=mixed", "train.max_steps=3", "eval.every_steps=null"]


def test_killed_mid_accumulation_in_mixed_precision_resumes_to_the_same_model(reference_mixed, tmp_path):
    """Fault injection at a chosen point: rank 1 dies after micro-batch 1 of step 2, half way through
    the accumulation, in mixed precision. (fp32 kills at random moments, bit for bit, are the
    chaos test's below.)"""
    run_dir = tmp_path / "run"
    argv = [*MIXED, f"run_dir={run_dir}"]
    killed = run(argv, nproc=2, env=fault(action="kill", at="micro", step=2, micro=1, rank=1))
    assert killed.returncode != 0
    resumed = run([*argv, "resume=auto"], nproc=2)
    ok(resumed)
    assert "(step 1, saved by 2 ranks)" in resumed.stdout  # the last complete checkpoint
    assert losses(run_dir) == pytest.approx(losses(reference_mixed), abs=1e-4)
    for name, tensor in weights(reference_mixed).items():
        assert torch.equal(weights(run_dir)[name], tensor), name


def test_killed_while_saving_resumes_from_the_previous_checkpoint(reference, tmp_path):
    run_dir = tmp_path / "run"
    killed = run(
        [*COMMON, f"run_dir={run_dir}"], nproc=2, env=fault(action="kill", at="save", step=3, rank=0)
    )
    assert killed.returncode != 0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step-00000003.tmp").is_dir() and not (checkpoints / "step-00000003").exists()
    # And a kill in the middle of a metrics row: the torn row once blocked every resume.
    log = run_dir / "metrics.jsonl"
    with log.open("ab") as f:
        f.write(b'{"step": 3, "train/loss": 9.8')
    torn_line = log.read_bytes().count(b"\n") + 1
    resumed = run([*COMMON, f"run_dir={run_dir}", "resume=auto"], nproc=2)
    ok(resumed)
    assert "(step 2, saved by 2 ranks)" in resumed.stdout
    assert resumed.stderr.count("torn row") == 1
    assert (
        f"{log}: skipped 1 torn row(s) (line {torn_line}), left by a run killed while writing"
        in resumed.stderr
    )
    assert losses(run_dir) == losses(reference)


def test_killed_while_deleting_an_old_checkpoint_keeps_the_new_one(reference, tmp_path):
    run_dir = tmp_path / "run"
    argv = [*COMMON[:-1], "checkpoint.keep_last=1", f"run_dir={run_dir}"]
    killed = run(argv, nproc=2, env=fault(action="kill", at="delete", step=3, rank=0))
    assert killed.returncode != 0
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-00000002.deleting", "step-00000003"]
    resumed = run([*argv, "resume=auto"], nproc=2)
    ok(resumed)
    assert "(step 3, saved by 2 ranks)" in resumed.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{STEPS:08d}"]
    assert losses(run_dir) == losses(reference)


@readme_command(
    "torchrun --nproc_per_node=8 --max-restarts=3 train.py ... checkpoint.every_steps=200 resume=auto"
)
def test_elastic_restart_after_a_rank_is_killed(reference, tmp_path):
    run_dir = tmp_path / "run"
    result = run(
        [*COMMON, f"run_dir={run_dir}", "resume=auto"],
        nproc=2,
        env=fault(action="kill", at="step", step=4, rank=1),  # first attempt only
        launcher_args=("--max-restarts=3",),
    )
    ok(result)
    assert "(step 3, saved by 2 ranks)" in result.stdout  # the restarted group resumed on its own
    assert losses(run_dir) == losses(reference)
    for name, tensor in weights(reference).items():
        assert torch.equal(weights(run_dir)[name], tensor), name


@pytest.mark.parametrize("world_size", [1, 4])
def test_resume_at_another_world_size(reference, tmp_path, world_size):
    run_dir = tmp_path / "run"
    argv = [*COMMON, f"run_dir={run_dir}", f"resume={reference / 'checkpoints' / 'step-00000003'}"]
    result = run(argv, nproc=None if world_size == 1 else world_size)
    ok(result)
    assert "(step 3, saved by 2 ranks)" in result.stdout
    continued = losses(run_dir)
    assert len(continued) == STEPS - 3
    for mine, theirs in zip(continued, losses(reference)[3:], strict=True):
        assert abs(mine - theirs) <= 1e-4


def test_corrupted_shard_is_named_and_auto_falls_back(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shard = run_dir / "checkpoints" / f"step-{STEPS:08d}" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    named = run([*COMMON, f"run_dir={run_dir}", f"resume={shard.parent}"], nproc=2)
    assert named.returncode != 0  # each rank exits 2; torchrun reports 1
    assert f"checkpoint error: {shard}: contents do not match the marker's CRC-32: corrupted" in named.stderr

    auto = run([*COMMON, f"run_dir={run_dir}", "resume=auto"], nproc=2)
    ok(auto)
    assert f"skipping a damaged checkpoint: {shard}" in auto.stderr
    assert f"(step {STEPS - 1}, saved by 2 ranks)" in auto.stdout
    assert losses(run_dir) == losses(reference)


def test_truncated_shard_and_missing_marker(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints" / "step-00000002", run_dir / "ck")
    shard = run_dir / "ck" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    result = run([*COMMON, f"run_dir={run_dir / 'r'}", f"resume={run_dir / 'ck'}"], nproc=None)
    assert result.returncode == 2 and f"{shard}: 1000 bytes, the marker says" in result.stderr

    (run_dir / "ck" / "COMPLETE.json").unlink()
    result = run([*COMMON, f"run_dir={run_dir / 'r'}", f"resume={run_dir / 'ck'}"], nproc=None)
    assert result.returncode == 2
    assert (
        f"resume.path={run_dir / 'ck'}: no COMPLETE.json; the checkpoint was not completed" in result.stderr
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.config_overrides.num_hidden_layers=3",
            "is another model: model.config_overrides.num_hidden_layers",
        ),
        ("precision=mixed", "is another precision: precision: checkpoint 'fp32', now 'mixed'"),
        ("seed=1", "was trained with another data order (seed: checkpoint 0, now 1)"),
        (
            "batch.max_seq_length=64",
            "was trained with another batch geometry (max_seq_length: checkpoint 128, now 64)",
        ),
    ],
)
def test_a_checkpoint_that_does_not_fit_the_config_is_refused(reference, override, message):
    # In process: train.py prints a ConfigError as one `config error: ...` line (test_train.py).
    from config import ConfigError, load_config, resolve_precision, validate

    cfg = load_config([*COMMON, f"run_dir={reference}", "resume=auto", override])
    resolve_precision(cfg)
    with pytest.raises(ConfigError) as refused:
        validate(cfg, 1)
    assert str(refused.value).startswith("resume: ") and message in str(refused.value)


def test_allow_config_change_resumes_anyway(reference, tmp_path):
    run_dir = tmp_path / "run"
    argv = [*COMMON, f"run_dir={run_dir}", f"resume={reference / 'checkpoints' / 'step-00000005'}", "seed=1"]
    assert run(argv, nproc=None).returncode == 2
    result = run([*argv, "resume.allow_config_change=true"], nproc=None)
    ok(result)
    assert len(losses(run_dir)) == 1


def test_nonfinite_loss_stops_or_skips(reference, tmp_path):
    nan = fault(action="nan", at="micro", step=3, micro=1)
    stopped = run([*COMMON, f"run_dir={tmp_path / 'stop'}"], nproc=2, env=nan)
    assert stopped.returncode != 0
    assert "non-finite step 3: loss nan" in stopped.stderr
    assert "on the data of epoch 1, batch 3 of" in stopped.stderr
    assert f"Last good checkpoint: {tmp_path / 'stop' / 'checkpoints' / 'step-00000002'}" in stopped.stderr

    skipped_dir = tmp_path / "skip"
    skipped = run([*COMMON, f"run_dir={skipped_dir}", "train.on_nonfinite=skip"], nproc=2, env=nan)
    ok(skipped)
    rows = read_metrics(skipped_dir / "metrics.jsonl")
    rows = [r for r in rows if "train/loss" in r]
    assert [r["train/skipped"] for r in rows] == [0, 0, 1, 0, 0, 0]
    assert losses(skipped_dir)[:2] == losses(reference)[:2]
    assert all(torch.isfinite(t).all() for t in weights(skipped_dir).values())


@readme_command("python -m fsdp.export runs/NAME/checkpoints/step-00000200 OUT_DIR")
def test_export_from_checkpoint_equals_the_end_of_training_export(reference, tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    out = tmp_path / "exported"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsdp.export",
            str(reference / "checkpoints" / f"step-{STEPS:08d}"),
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    ok(result)
    live = sorted(p.name for p in (reference / "model").iterdir())
    assert sorted(p.name for p in out.iterdir()) == live
    for name in live:
        assert (out / name).read_bytes() == (reference / "model" / name).read_bytes(), name


def test_each_save_logs_its_time_and_bytes(reference):
    rows = read_metrics(reference / "metrics.jsonl")
    saves = [r for r in rows if "checkpoint/bytes" in r]
    assert [r["step"] for r in saves] == list(range(1, STEPS + 1))
    sizes = [r["checkpoint/bytes"] for r in saves]
    # Every checkpoint holds the same tensors; only meta.json grows, with the evaluations so far.
    assert max(sizes) - min(sizes) < 4096
    # fp32 weights + AdamW's two moments: 12 bytes per parameter of the 3.2M; DCP stores the tied
    # output head as a second copy of the 49152 x 64 embedding; then RNG, metadata, the tokenizer (3.5 MB).
    tensors = 12 * 3_219_776 + 4 * 49152 * 64
    assert all(tensors < size < tensors + 5 * 2**20 for size in sizes)
    assert all(0 < r["checkpoint/save_s"] < 30 for r in saves)


def test_killing_the_launcher_alone_stops_its_workers(tmp_path):
    """kill -9 of torchrun alone: its workers (in sessions of their own) exit within seconds and
    write nothing more. While the run lives, a second run into its folder is refused, overwrite or not."""
    run_dir = tmp_path / "run"
    argv = [*COMMON[:4], "train.epochs=100", "train.max_steps=400", "checkpoint.every_steps=50"]
    argv += ["eval.every_steps=null", f"run_dir={run_dir}"]
    first = launch(argv, tmp_path / "first.log")
    try:
        deadline = time.time() + 180
        while train_rows(run_dir) < 3:
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[
                -3000:
            ]
            time.sleep(0.2)
        holder = json.loads((run_dir / "run.lock").read_text())
        workers = descendants(first.pid)
        assert holder["pid"] in workers and holder["host"] == socket.gethostname()

        second = run([*argv, "overwrite=true"], nproc=2)
        assert second.returncode != 0
        assert (
            f"run_dir={run_dir}: a live run holds it (pid {holder['pid']} on {holder['host']}, started "
            in (second.stderr)
        )
        assert "checkpoint" not in second.stdout and first.poll() is None  # it changed nothing

        rows_before = train_rows(run_dir)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        lived = wait_gone(workers, timeout=10)
        assert lived is not None and lived < 5
        # At most the row being written as the launcher died (reading the count and killing are
        # two moments); then nothing, ever.
        assert train_rows(run_dir) - rows_before <= 1
        size = (run_dir / "metrics.jsonl").stat().st_size
        time.sleep(2)
        assert (run_dir / "metrics.jsonl").stat().st_size == size
        said = (tmp_path / "first.log").read_text()
        for rank in (0, 1):
            gone = f"rank {rank}: the launcher (torchrun, pid {first.pid}) is gone; stopping without writing anything more"
            assert gone in said
    finally:
        for pid in [first.pid, *descendants(first.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_random_kills_of_the_whole_tree_resume_bit_for_bit(tmp_path):
    """4 SIGKILLs of torchrun and all its workers at random moments, resume=auto after each: no
    start fails but by being killed, none resumes from older than the latest complete checkpoint
    (experiments/chaos.py checks both), and the run ends as the uninterrupted one, bit for bit."""
    # Its own reference, timed: the kills spread over start-up and the first half of training, and
    # a checkpoint every 4 steps, so most attempts redo steps and no early survivor ends the run.
    argv = [*COMMON[:4], "train.max_steps=12", "checkpoint.every_steps=4", "checkpoint.keep_last=2"]
    argv += ["eval.every_steps=4"]
    # The own answers travel in the checkpoints: answered again by a resumed model, they would differ.
    argv += [
        "eval.own_answers.prompts=data/samples/general-questions.txt",
        "eval.own_answers.max_new_tokens=4",
    ]
    reference = tmp_path / "reference"
    startup, total = timeline(argv, reference, tmp_path / "reference.log")
    run_dir = tmp_path / "run"
    # From 0.8 of the way into start-up: with 4 kills, most land in training (make soak: hundreds).
    window = kill_window(startup, total, reach=0.5, start=0.8)
    attempts = chaos(argv, run_dir, kills=4, seed=0, kinds=("tree",), window=window)
    # Up to 4 kills: an attempt resumed near the end can outrun its kill and finish the run.
    assert 2 <= sum(a.kind == "tree" for a in attempts) <= 4 and attempts[-1].kind is None
    print(summarize(attempts))
    assert sum(bool(a.kind and a.new_steps) for a in attempts) >= 2  # kills in training, not only start-up
    difference = compare(run_dir, reference)
    assert difference == {
        "steps": 12,
        "loss differences": 0,
        "weight differences": 0,
        "eval.json equal": True,
        "generations.json equal": True,
    }
    assert not (run_dir / "run.lock").exists()


def test_a_finished_run_stays_finished(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    written = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    again = run([*COMMON, f"run_dir={run_dir}", "resume=auto"], nproc=2)
    ok(again)
    assert (
        f"done: run_dir={run_dir} finished at step {STEPS}; the model is in {run_dir / 'model'}"
        in again.stdout
    )
    assert "resumed from" not in again.stdout  # no model built, nothing evaluated or exported
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == written

    # A torn export (cut in half) is redone from the final checkpoint, and nothing else is.
    exported = run_dir / "model" / "model.safetensors"
    exported.write_bytes(exported.read_bytes()[: exported.stat().st_size // 2])
    redone = run([*COMMON, f"run_dir={run_dir}", "resume=auto"], nproc=2)
    ok(redone)
    checkpoint = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    assert (
        f"export: {exported}: torn (" in redone.stdout
        and f"exporting again from {checkpoint}" in redone.stdout
    )
    for name in sorted(p.name for p in (reference / "model").iterdir()):
        assert (run_dir / "model" / name).read_bytes() == (reference / "model" / name).read_bytes(), name
    for name in ("eval.json", "summary.json", "metrics.jsonl", "generations.md"):
        assert (run_dir / name).stat().st_mtime_ns == written[run_dir / name]


def test_a_parent_running_another_program_is_not_the_launcher():
    """A rank orphaned before its watch began has a reaper for a parent: another program. torchrun
    starts its ranks with its own interpreter, even as a container's pid 1."""
    import subprocess
    import sys

    from fsdp.dist import runs_interpreter

    assert runs_interpreter(os.getpid(), sys.executable)
    other = subprocess.Popen(["sleep", "30"])
    try:
        assert not runs_interpreter(other.pid, sys.executable)
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="a pid namespace needs unshare and root"
)
def test_torchrun_as_pid_1_trains(tmp_path):
    """torchrun as a container's entrypoint is pid 1: its ranks must not take that for an orphaning."""
    import subprocess
    import sys

    from tests.helpers import REPO

    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            *torchrun,
            "train.py",
            *COMMON[:4],
            f"run_dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    ok(result)
    assert "is gone" not in result.stderr and len(losses(run_dir)) == 4  # the tiny preset's 4 steps


@readme_command(
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=NODE0_HOST:29500 --rdzv_id=ft1 "
    "train.py preset=llama3-8b-8xh100 data=jsonl data.path=/shared/train.jsonl run_dir=/shared/runs/ft1",
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=NODE0_HOST:29500 --rdzv_id=ft1 "
    "train.py preset=llama3-8b-8xh100 data=jsonl data.path=train.jsonl run_dir=/shared/runs/ft1",
    "git clone . /tmp/node0 && git clone . /tmp/node1",
    "(cd /tmp/node0 && torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d "
    "--rdzv_endpoint=127.0.0.1:29511 --rdzv_id=sim train.py preset=tiny run_dir=/tmp/shared/run) &",
    "(cd /tmp/node1 && torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d "
    "--rdzv_endpoint=127.0.0.1:29511 --rdzv_id=sim train.py preset=tiny run_dir=/tmp/shared/run)",
)
def test_two_nodes_from_two_checkouts_train_resume_and_export(reference, tmp_path):
    """Two nodes simulated on one machine: two checkouts with caches of their own, one torchrun each
    (c10d rendezvous), only run_dir shared. Node 1's rank is killed at step 4; both resume=auto."""
    nodes = node_checkouts(tmp_path)
    run_dir = tmp_path / "shared" / "run"
    argv = [*COMMON, f"run_dir={run_dir}", "resume=auto"]
    first = run_nodes(nodes, argv, env=fault(action="kill", at="step", step=4, rank=1))
    assert all(r.returncode != 0 for r in first)
    assert max(p.name for p in (run_dir / "checkpoints").iterdir()) == "step-00000003"
    second = run_nodes(nodes, argv)
    for result in second:
        ok(result)
    assert "(step 3, saved by 2 ranks)" in second[0].stdout + second[1].stdout
    assert "2-D mesh (HSDP): 2 replicas x 1 shards" in second[0].stdout + second[1].stdout
    # Each node tokenized into its own cache, under one key: the data's content, not its path.
    cached = [sorted(p.name for p in (node / ".cache" / "tokenized").iterdir()) for node in nodes]
    assert cached[0] == cached[1] and len(cached[0]) == 2 and "digests" in cached[0]
    # The same training as one node of two ranks (HSDP 2 x 1 there, 1-D here: sums in another order).
    assert max(abs(a - b) for a, b in zip(losses(run_dir), losses(reference), strict=True)) <= 1e-5
    mine, theirs = weights(run_dir), weights(reference)
    for name, tensor in theirs.items():  # exported in bf16: equal to within its rounding
        torch.testing.assert_close(mine[name], tensor, rtol=2**-7, atol=1e-5, msg=name)


def test_a_run_dir_that_is_not_shared_is_refused_on_every_node(tmp_path):
    nodes = node_checkouts(tmp_path)
    start = time.monotonic()
    results = run_nodes(nodes, [*COMMON, "run_dir=runs/private"], timeout=120)
    assert time.monotonic() - start < 60
    for result in results:
        assert result.returncode != 0  # the rank's exit status 2 becomes torchrun's 1
        line = "run_dir=runs/private is not one folder shared by every rank: rank 1 on"
        assert line in result.stderr, result.stderr[-2000:]
    assert not any((node / "runs" / "private").exists() for node in nodes)  # nothing left behind


def test_overwrite_starts_clean_and_a_failed_start_keeps_the_old_run(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    old = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # A new run that stops on its data, after the process group, writes nothing and removes nothing.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a" "response": "b"}\n')
    refused = run([*COMMON, f"run_dir={run_dir}", "overwrite=true", "data=jsonl", f"data.path={bad}"], None)
    assert refused.returncode == 2 and "data error: " in refused.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == old
    # A new run of 2 steps replaces the old one of 6: none of the old checkpoints, logs or model stay.
    ok(result := run([*COMMON, f"run_dir={run_dir}", "overwrite=true", "train.max_steps=2"], None))
    assert "overwrite=true: removed the previous run's checkpoints/, config.yaml, eval.json" in result.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert len(losses(run_dir)) == 2 and json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    # so resume=auto can only find the new run's checkpoints, never the old step 6
    latest = json.loads((run_dir / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert latest["total_steps"] == 2 and latest["config"]["train"]["max_steps"] == 2
