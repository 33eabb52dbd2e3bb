"""Kill a training run the way the world does, again and again, and check it ends as if never killed.

    make soak                                   # 50 kills, about 13 minutes on 2 cores
    python -m experiments.chaos --kills 50 --kinds tree,launcher --out docs/soak

A run (the tiny preset, 2 ranks, fp32) is started with `resume=auto` and SIGKILLed at a random
wall-clock moment (seeded), then started again, and again, until it has been killed `--kills`
times; then it runs to its end. Two kinds of kill:

    tree       torchrun, its workers and theirs, all at once: a node that dies
    launcher   torchrun alone: a launcher stopped by hand, a runtime that signals only its main
               process. Its workers must notice and exit within seconds, writing nothing more.

What must hold: no start fails for any reason but being killed; each resume starts from the
latest complete checkpoint at the moment of the kill (steps lost beyond it: 0); the per-step
losses, eval.json, generations.json and the exported weights equal an uninterrupted run's, bit
for bit. tests/test_checkpoint.py runs 10 tree kills; the soak's figures are in docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from durable import write_json
from fsdp.checkpoint import CheckpointError, complete_checkpoints, step_of, verify_checkpoint
from fsdp.dist import proc_stat
from fsdp.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
# The tiny preset, 2 ranks, fp32, a checkpoint every 3 steps; long enough that 50 kills, each
# landing within a few seconds of training, leave it unfinished until the last start.
SOAK_ARGV = [
    "preset=tiny",
    "precision=fp32",
    "optim.lr=2e-3",
    "batch.global_batch_size=8",
    "train.epochs=20",
    "train.max_steps=300",
    "checkpoint.every_steps=3",
    "checkpoint.keep_last=2",
    "eval.every_steps=50",
]


@dataclass
class Attempt:
    kind: str | None  # how it was killed; None: it ran to its end
    seconds: float  # from launch to the kill (or the end)
    resumed_from: int  # the step it resumed from (0: a fresh start)
    checkpoint_at_kill: int | None  # the latest complete checkpoint once it was dead
    logged_step: int  # the last step metrics.jsonl held once it was dead
    new_steps: int  # the training steps this attempt logged
    workers_exit_s: float | None = None  # launcher kills: how long the orphaned workers lived on


def launch(argv: list[str], log: Path, nproc: int = 2) -> subprocess.Popen:
    """train.py under torchrun, in a session of its own, stdout and stderr to `log`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:  # the child holds its own descriptor from here on
        return subprocess.Popen(
            [*command, "train.py", *argv],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun's workers sit in sessions of their own: not its group)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = proc_stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def wait_gone(pids: list[int], timeout: float) -> float | None:
    """Seconds until every pid has exited, or None if some still live after `timeout`."""
    start = time.perf_counter()
    while any(alive(p) for p in pids):
        if time.perf_counter() - start > timeout:
            return None
        time.sleep(0.05)
    return time.perf_counter() - start


def kill(proc: subprocess.Popen, kind: str) -> float | None:
    """SIGKILL torchrun alone (`launcher`) or with every process below it (`tree`). Returns how
    long the workers outlived a killed launcher (None for a tree kill)."""
    below = descendants(proc.pid)
    if kind == "tree":
        for pid in [proc.pid, *below]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        for pid in descendants(proc.pid) + below:  # any started in between: they see no launcher
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        wait_gone(below, 10)
        return None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lived = wait_gone(below, 15)
    if lived is None:
        raise AssertionError(f"workers {below} still run 15 s after their launcher was killed")
    return lived


def latest_complete(run_dir: Path) -> int | None:
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return step_of(path)
        except CheckpointError:
            continue
    return None


def last_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    return max((r["step"] for r in rows if "train/loss" in r), default=0)


def train_rows(run_dir: Path) -> int:
    """Training rows ever appended to metrics.jsonl (a fresh start removes the file)."""
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b'"train/loss"') if path.is_file() else 0


def resumed_from(log: Path) -> int:
    text = log.read_text(errors="replace")
    found = re.search(r"resumed from \S+ \(step (\d+),", text)
    done = re.search(r"done: run_dir=\S+ finished at step (\d+)", text)
    return int(found.group(1)) if found else int(done.group(1)) if done else 0


def timeline(argv: list[str], run_dir: Path, log: Path) -> tuple[float, float]:
    """Run `argv` uninterrupted into `run_dir` (the reference): the seconds until its first step was
    logged (start-up: imports, process group, data, model) and the seconds in all."""
    start, first = time.perf_counter(), None
    proc = launch([*argv, f"run_dir={run_dir}"], log)
    while proc.poll() is None:
        if first is None and train_rows(run_dir) > 0:
            first = time.perf_counter() - start
        time.sleep(0.05)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise AssertionError(f"the uninterrupted run failed (exit {proc.returncode}): {log}")
    return first or total, total


def kill_window(startup: float, total: float, reach: float, start: float = 0.3) -> tuple[float, float]:
    """When to kill, in seconds after a launch: from `start` of the way into start-up to `reach` of
    the way through the rest. Kills spread over start-up and training, and each attempt gets only
    part of the way: a window as long as the run would let the first survivor finish it, and every
    later kill would land on a finished run."""
    return start * startup, startup + reach * (total - startup)


def chaos(
    argv: list[str],
    run_dir: Path,
    kills: int,
    seed: int = 0,
    kinds: tuple[str, ...] = ("tree",),
    window: tuple[float, float] = (2.0, 14.0),
    logs: Path | None = None,
) -> list[Attempt]:
    """Start `argv` with resume=auto into `run_dir`, kill it `kills` times at random moments
    (uniform in `window` seconds after each launch; an attempt that ends first is started again),
    then let it finish; if an attempt outruns its kill and finishes the run, that is the end, with
    fewer kills. Returns every attempt;
    raises AssertionError if an attempt fails on its own or a resume loses a complete checkpoint."""
    rng = random.Random(seed)
    logs = logs or run_dir.with_name(run_dir.name + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    attempts: list[Attempt] = []
    expected = 0  # the latest complete checkpoint when the previous attempt died
    while True:
        log = logs / f"attempt-{len(attempts):03d}.log"
        start, rows_before = time.perf_counter(), train_rows(run_dir)
        proc = launch([*argv, f"run_dir={run_dir}", "resume=auto"], log)
        killing = len([a for a in attempts if a.kind]) < kills
        kind, delay = (rng.choice(kinds), rng.uniform(*window)) if killing else (None, 3600.0)
        try:
            proc.wait(timeout=delay)
            kind = None
        except subprocess.TimeoutExpired:
            lived = kill(proc, kind)
        seconds = time.perf_counter() - start
        if kind is None and proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise AssertionError(
                f"attempt {len(attempts)} failed on its own (exit {proc.returncode}):\n{tail}"
            )
        resumed = resumed_from(log)
        said = kind is None or "resumed from" in log.read_text(errors="replace")
        if said and resumed != expected:
            raise AssertionError(
                f"attempt {len(attempts)} resumed from step {resumed}, the latest complete checkpoint "
                f"was step {expected}: {log}"
            )
        rows = train_rows(run_dir)
        new = rows - rows_before if rows >= rows_before else rows
        attempt = Attempt(
            kind, round(seconds, 2), resumed, latest_complete(run_dir), last_logged(run_dir), new
        )
        attempt.workers_exit_s = round(lived, 3) if kind == "launcher" else None
        attempts.append(attempt)
        expected = attempt.checkpoint_at_kill or 0
        if not killing:
            return attempts  # killed `kills` times, then let run to its end
        if kind is None and (run_dir / "summary.json").is_file():
            # An attempt outran its kill and finished the run (resumed near the end, it had little
            # left): every later start would only say so, so no later kill could land in training.
            return attempts


def summarize(attempts: list[Attempt]) -> dict:
    killed = [a for a in attempts if a.kind]
    exits = [a.workers_exit_s for a in killed if a.workers_exit_s is not None]
    return {
        "kills": len(killed),
        "tree kills": sum(a.kind == "tree" for a in killed),
        "launcher kills": sum(a.kind == "launcher" for a in killed),
        "starts": len(attempts),
        "resumes from a checkpoint": sum(a.resumed_from > 0 for a in attempts),
        "kills after training began": sum(a.new_steps > 0 for a in killed),
        "steps lost beyond the last checkpoint": 0,  # chaos() raises otherwise
        "steps redone (logged past the last checkpoint)": sum(
            max(0, a.logged_step - (a.checkpoint_at_kill or 0)) for a in killed
        ),
        "slowest worker exit after a launcher kill (s)": max(exits, default=None),
        "seconds": round(sum(a.seconds for a in attempts), 1),
    }


def compare(run_dir: Path, reference: Path) -> dict:
    """Differences from the uninterrupted run: per-step losses, reports, exported weights."""
    from safetensors.torch import load_file

    def losses(d: Path) -> list[float]:
        return [r["train/loss"] for r in read_metrics(d / "metrics.jsonl") if "train/loss" in r]

    mine, theirs = (load_file(d / "model" / "model.safetensors") for d in (run_dir, reference))
    return {
        "steps": len(losses(reference)),
        "loss differences": sum(a != b for a, b in zip(losses(run_dir), losses(reference), strict=True)),
        "weight differences": sum(not mine[k].equal(theirs[k]) for k in theirs)
        + len(set(mine) ^ set(theirs)),
        "eval.json equal": json.loads((run_dir / "eval.json").read_text())
        == json.loads((reference / "eval.json").read_text()),
        "generations.json equal": json.loads((run_dir / "generations.json").read_text())
        == json.loads((reference / "generations.json").read_text()),
    }


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--kinds", default="tree,launcher")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reach", type=float, default=8.0, help="seconds past start-up the kills reach")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "soak")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "soak")
    args = parser.parse_args(argv)
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    reference, run_dir = args.work / "reference", args.work / "run"
    startup, total = timeline(SOAK_ARGV, reference, args.work / "reference.log")
    window = (0.3 * startup, startup + args.reach)
    kinds = tuple(args.kinds.split(","))
    attempts = chaos(SOAK_ARGV, run_dir, args.kills, args.seed, kinds, window, args.work / "logs")
    result = {
        "machine": machine(),
        "uninterrupted run (s)": round(total, 1),
        "its start-up (s)": round(startup, 1),
        "kill window (s after launch)": [round(w, 1) for w in window],
        **summarize(attempts),
        **compare(run_dir, reference),
        "attempts": [asdict(a) for a in attempts],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "soak.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "attempts"}, indent=1))
    ok = result["loss differences"] == 0 and result["weight differences"] == 0 and result["eval.json equal"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
