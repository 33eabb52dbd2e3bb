"""Files that survive a kill at any byte, the run folder's lock, and the rule that nothing else writes.

The end-to-end kills (a launcher killed alone, random kills of the whole tree, a torn log row, a
finished run started again) are in test_checkpoint.py; here each piece is held to its contract.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from durable import AppendLog, publish_folder, read_jsonl, write_atomic
from fsdp import rundir
from fsdp.export import export_problem
from fsdp.metrics import RESUMED, read_metrics
from fsdp.rundir import RunDirBusy, RunLock, this_machine

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.fast
def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "eval.json"
    write_atomic(path, '{"old": 1}')
    write_atomic(path, b'{"new": 2}')
    assert json.loads(path.read_text()) == {"new": 2}

    def dies_halfway(tmp: Path) -> None:
        tmp.write_text('{"torn": ')
        raise KeyboardInterrupt  # a kill between the write and the rename

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, dies_halfway)
    assert json.loads(path.read_text()) == {"new": 2}  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # no temporary left behind

    write_atomic(tmp_path / "t.pt", lambda tmp: torch.save(torch.arange(3), tmp))
    assert torch.equal(torch.load(tmp_path / "t.pt"), torch.arange(3))


@pytest.mark.fast
def test_publish_folder_swaps_whole_folders(tmp_path):
    final, tmp = tmp_path / "model", tmp_path / "model.tmp"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    publish_folder(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.fast
def test_a_torn_row_is_ended_skipped_once_and_the_log_goes_on(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = AppendLog(path)
    for step in (1, 2):
        log.write({"step": step, "train/loss": 10.0 - step})
    log.close()
    with path.open("ab") as f:
        f.write(b'{"step": 3, "train/lo')  # a kill in the middle of a row
    log = AppendLog(path)  # the resumed run
    log.write({"step": 3, "train/loss": 7.0})
    log.close()
    assert path.read_bytes().count(b"\n") == 4  # the torn row kept its own line
    warnings = []
    rows = read_jsonl(path, warnings.append)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["train/loss"] == 7.0
    assert warnings == [f"{path}: skipped 1 torn row(s) (line 3), left by a run killed while writing"]
    # The report of the issue: the torn row `18973}` once blocked every resume.
    with path.open("ab") as f:
        f.write(b"18973}\n")
    assert len(read_jsonl(path, warnings.append)) == 3 and "skipped 2 torn row(s) (line 3, 5)" in warnings[-1]


@pytest.mark.fast
def test_read_metrics_keeps_the_last_row_of_each_step_after_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = AppendLog(path)
    for step in (1, 2, 3, 4):  # the attempt that died after step 4; its checkpoint was step 2
        log.write({"step": step, "train/loss": float(step)})
    log.write({"step": 2, "eval/domain/loss": 5.0})
    log.write({"step": 2, "event": RESUMED})
    log.write({"step": 3, "train/loss": 30.0})  # step 3 redone; step 4 not yet
    log.close()
    rows = read_metrics(path)
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert rows[1]["eval/domain/loss"] == 5.0


def _safetensors_folder(folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.ones(64, 64)}, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


@pytest.mark.fast
def test_export_problem_tells_a_whole_folder_from_a_torn_one(tmp_path):
    weights = _safetensors_folder(tmp_path / "model")
    assert export_problem(tmp_path / "model") is None
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert export_problem(tmp_path / "model") == (
        f"{weights}: torn ({len(data) // 2} bytes, its header describes {len(data)})"
    )
    weights.write_bytes(data[:20])
    assert export_problem(tmp_path / "model") == f"{weights}: torn (its header does not parse)"
    weights.unlink()
    assert export_problem(tmp_path / "model") == f"{weights}: missing"
    assert export_problem(tmp_path / "nothing") == f"{tmp_path / 'nothing'}: no config.json"


def _lock_file(path: Path, pid: int, heartbeat: float, machine: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = {
        "host": (machine or this_machine())["host"],
        "pid": pid,
        "started": heartbeat - 60,
        "heartbeat": heartbeat,
        "token": "theirs",
        "machine": machine or this_machine(),
        "process start": rundir.process_start(pid),
    }
    path.write_text(json.dumps(holder))


@pytest.mark.fast
def test_a_live_lock_refuses_and_names_its_holder(tmp_path):
    run_dir = tmp_path / "run"
    _lock_file(run_dir / "run.lock", os.getpid(), time.time())  # this very process: alive
    with pytest.raises(RunDirBusy, match=rf"run_dir={run_dir}: a live run holds it \(pid {os.getpid()} on "):
        RunLock(run_dir).acquire()
    assert json.loads((run_dir / "run.lock").read_text())["token"] == "theirs"  # untouched
    # A holder on another machine: tests/test_rundir.py (its heartbeat watched, clocks skewed).


def test_a_dead_or_stale_lock_is_taken_over_with_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)  # it has exited: its lock is dead at once, whatever its heartbeat
    _lock_file(run_dir / "run.lock", dead_pid, time.time())
    lock = RunLock(run_dir)
    warnings = lock.acquire()
    assert (
        len(warnings) == 1
        and f"took over a stale lock (pid {dead_pid} on {socket.gethostname()}" in warnings[0]
    )
    assert warnings[0].endswith("its process is gone")
    held = json.loads((run_dir / "run.lock").read_text())
    assert held["pid"] == os.getpid() and held["token"] == lock.token
    with pytest.raises(RunDirBusy):  # a second run of our own is refused too
        RunLock(run_dir).acquire()
    lock.release()
    assert sorted(p.name for p in run_dir.iterdir()) == []  # no stale copy left behind


@pytest.mark.fast
def test_the_heartbeat_renews_and_release_leaves_no_trace(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_SECONDS", 0.05)
    run_dir = tmp_path / "new" / "run"
    lock = RunLock(run_dir)
    assert lock.acquire() == []
    first = json.loads((run_dir / "run.lock").read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((run_dir / "run.lock").read_text())["heartbeat"] > first
    lock.release()
    assert not run_dir.exists()  # the run created the folder and wrote nothing else: it is gone
    assert (tmp_path / "new").is_dir()


# Writes that are not atomic, by call name; the allowed exceptions, by file and reason.
RAW_WRITES = {"write_text", "write_bytes", "save", "save_file", "savefig", "dump", "to_csv"}
ALLOWED = {
    ("fsdp/memory/ledger.py", "write_text"): "/proc/self/clear_refs is a kernel switch, not a file",
    ("fsdp/checkpoint.py", "dcp.save"): "DCP fills step-N.tmp, fsynced before the marker and the rename",
    ("data/tokens.py", "open(..., ['wb'])"): "the token arrays stream into a .tmp folder published whole",
}
HF_WRITERS = {"fsdp/export.py", "shipped/model.py"}  # save_pretrained into a folder published whole


def _writes(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that write a file other than through durable's helpers (a lambda handed to
    write_atomic may write its temporary file)."""
    inside_atomic: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", "")) == "write_atomic"
        ):
            inside_atomic |= {id(n) for arg in node.args for n in ast.walk(arg)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in inside_atomic:
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        if name == "open":
            modes = [
                a.value
                for a in [*node.args, *(k.value for k in node.keywords)]
                if isinstance(a, ast.Constant)
            ]
            if any(isinstance(m, str) and set(m) & set("wx+") for m in modes):
                found.append((node.lineno, f"open(..., {modes})"))
        elif name in RAW_WRITES or name == "save_pretrained":
            owner = getattr(node.func, "value", None)
            found.append((node.lineno, f"{owner.id}.{name}" if isinstance(owner, ast.Name) else name))
    return found


@pytest.mark.fast
def test_no_file_is_written_in_place_anywhere_in_the_code():
    offenders = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith((".venv/", ".cache/", "tests/", "durable/", "runs/")):
            continue
        for line, name in _writes(ast.parse(path.read_text(), rel)):
            hf_writer = name.endswith("save_pretrained") and rel in HF_WRITERS
            allowed = (rel, name) in ALLOWED or hf_writer
            if not allowed:
                offenders.append(f"{rel}:{line} {name}")
    assert offenders == [], "write through durable.write_atomic / publish_folder / AppendLog"
    # The check itself finds what it looks for.
    sample = "import json\nopen('x', 'w')\nPath('y').write_text('z')\nwrite_atomic(p, lambda t: t.write_text('ok'))"
    sample += "\ntorch.save(x, 'y.pt')\nwrite_atomic(p, partial(torch.save, x))"
    found = [name for _, name in _writes(ast.parse(sample))]
    assert found == ["open(..., ['x', 'w'])", "write_text", "torch.save"]
