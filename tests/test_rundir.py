"""The run folder: overwrite=true removes only what runs write, places that are never run folders
are refused, and the lock's heartbeat and takeover hold up to a flaky disk and skewed clocks.

All of it without a process group: the functions are called directly, faults injected by
monkeypatch; one subprocess shows the refusal as users see it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from config import ConfigError, load_config, validate
from fsdp import rundir
from fsdp.rundir import RunDirBusy, RunLock, clear_previous_run, run_dir_problem, run_writes

REPO = Path(__file__).resolve().parent.parent
TINY = ["preset=tiny"]  # a random tiny model and the sample data in the checkout: no cache needed


def _user_files(run_dir: Path) -> None:
    (run_dir / "notes").mkdir(parents=True)
    (run_dir / "notes" / "idea.md").write_text("mine\n")
    (run_dir / "thesis.txt").write_text("years of work\n")
    (run_dir / "metrics.jsonl").write_text("{}\n")  # beside a run's own file


@pytest.mark.fast
@pytest.mark.parametrize("overwrite", ["true", "false"])
def test_a_run_dir_holding_a_user_s_files_is_refused_naming_them(tmp_path, overwrite):
    run_dir = tmp_path / "mine"
    _user_files(run_dir)
    with pytest.raises(ConfigError) as refused:
        validate(load_config([*TINY, f"run_dir={run_dir}", f"overwrite={overwrite}"]), 1)
    assert str(refused.value) == (
        f"run_dir={run_dir} holds files no run writes (notes/, thesis.txt); fulltune removes only a "
        "run's own files with overwrite=true: move them or choose another run_dir"
    )
    assert (run_dir / "thesis.txt").read_text() == "years of work\n"


def test_train_py_refuses_a_user_s_folder_in_one_line_before_any_work(tmp_path):
    run_dir = tmp_path / "mine"
    _user_files(run_dir)
    result = subprocess.run(
        [sys.executable, "train.py", *TINY, f"run_dir={run_dir}", "overwrite=true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"config error: run_dir={run_dir} holds files no run writes (notes/, thesis.txt); fulltune "
        "removes only a run's own files with overwrite=true: move them or choose another run_dir\n"
    )
    assert result.stdout == ""
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "notes", "thesis.txt"]


@pytest.mark.fast
def test_the_root_a_home_a_checkout_and_a_git_work_tree_are_never_run_dirs(tmp_path):
    work_tree = tmp_path / "project"
    (work_tree / ".git").mkdir(parents=True)
    cases = {
        Path("/"): "the file system's root",
        Path.home(): "your home folder",
        REPO: "fulltune's checkout",
        work_tree: "a git work tree",
    }
    for place, reason in cases.items():
        assert run_dir_problem(place) == (
            f"run_dir={place} is {reason}, never a run folder: choose a folder of its own (e.g. runs/NAME)"
        )
    assert run_dir_problem(Path(".")) is not None  # the checkout, named relatively (tests run in it)
    assert run_dir_problem(work_tree / "runs" / "x") is None  # inside a work tree is fine: runs/NAME is
    # The home folder, as users write it: `~` is expanded for every reader of run_dir.
    with pytest.raises(ConfigError, match=re.escape(f"run_dir={Path.home()} is your home folder")):
        validate(load_config([*TINY, "run_dir=~", "overwrite=true"]), 1)


@pytest.mark.fast
def test_a_tilde_in_run_dir_is_the_home_folder():
    assert load_config([*TINY, "run_dir=~/runs/x"]).run_dir == str(Path.home() / "runs" / "x")
    assert load_config([*TINY, "run_dir='~/y'"]).run_dir == str(Path.home() / "y")
    assert load_config(TINY).run_dir == "runs/tiny"  # a relative run_dir stays as it is


@pytest.mark.fast
def test_a_run_s_own_files_are_accepted_and_cleared(tmp_path, capsys):
    run_dir = tmp_path / "run"
    for name in ("checkpoints/step-00000002", "tensorboard", "model", "model.tmp"):
        (run_dir / name).mkdir(parents=True)
    own = [
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "eval.json",
        "generations.json",
        "generations.md",
        "memory.json",
        "memory_snapshot_rank3.pickle",
        "run.lock",
        ".summary.json.tmp-node-7-123",  # a killed write_atomic
        ".run.lock.stale-abc",  # a killed takeover
    ]
    for name in own:
        (run_dir / name).write_text("x")
    (run_dir / ".nfs000000000123abcd00000001").write_text("x")  # NFS's name for a lock being replaced
    assert run_dir_problem(run_dir) is None
    validate(load_config([*TINY, f"run_dir={run_dir}", "overwrite=true"]), 1)
    removed = clear_previous_run(run_dir)
    # the live run's lock stays, and NFS's silly-renamed file is the NFS client's to remove
    assert sorted(p.name for p in run_dir.iterdir()) == [".nfs000000000123abcd00000001", "run.lock"]
    assert "checkpoints/" in removed and "memory_snapshot_rank3.pickle" in removed and len(removed) == 14
    assert "overwrite=true: removed the previous run's .run.lock.stale-abc, " in capsys.readouterr().out


@pytest.mark.fast
def test_clearing_never_follows_a_link_out_of_run_dir(tmp_path):
    outside = tmp_path / "outside"
    (outside / "checkpoints" / "step-00000009").mkdir(parents=True)
    (outside / "checkpoints" / "step-00000009" / "meta.json").write_text("{}")
    (outside / "precious.txt").write_text("keep")
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "weights").symlink_to(outside)  # a link inside a folder a run wrote
    (run_dir / "checkpoints").symlink_to(outside / "checkpoints")  # checkpoints on another disk
    (run_dir / "tensorboard").symlink_to(outside)
    (run_dir / "summary.json").symlink_to(outside / "precious.txt")
    assert run_dir_problem(run_dir) is None
    (run_dir / "late.txt").write_text("a user's, put there after the checks")
    removed = clear_previous_run(run_dir)
    assert removed == ["checkpoints", "model/", "summary.json", "tensorboard"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["late.txt"]
    assert (outside / "precious.txt").read_text() == "keep"
    assert (outside / "checkpoints" / "step-00000009" / "meta.json").is_file()


@pytest.mark.fast
def test_every_name_the_code_writes_into_run_dir_is_a_run_s(tmp_path):
    """Each name the code joins to run_dir (run_dir / "x", Path(cfg.run_dir) / "x") is in RUN_WRITES,
    so a new file a run writes cannot make its own run_dir refused, nor stay behind after overwrite."""
    joined = re.compile(r"(?:Path\((?:cfg\.)?run_dir\)|\brun_dir)\s*/\s*f?[\"']([^\"']+)[\"']")
    written = set()
    for path in [REPO / "train.py", *(REPO / "fsdp").rglob("*.py"), *(REPO / "config").rglob("*.py")]:
        for name in joined.findall(path.read_text()):
            written.add(re.sub(r"\{[^}]*\}", "0", name))  # memory_snapshot_rank{rank}.pickle
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "model", "memory_snapshot_rank0.pickle"} <= written
    assert [name for name in sorted(written) if not run_writes(name)] == []


def _renewing(path: Path, holder: dict, stop: threading.Event) -> None:
    """A holder on another machine whose lock file is renewed every 50 ms, its clock wherever it is."""
    while not stop.wait(0.05):
        holder = {**holder, "heartbeat": holder["heartbeat"] + 0.05}
        tmp = path.with_name(".renew")
        tmp.write_text(json.dumps(holder))
        os.replace(tmp, path)


def _remote_holder(heartbeat: float) -> dict:
    machine = {"host": "node-7", "boot": "b", "pid namespace": "p"}
    return {"host": "node-7", "pid": 12345, "started": heartbeat - 60, "heartbeat": heartbeat,
            "token": "theirs", "machine": machine, "process start": "1"}  # fmt: skip


@pytest.mark.fast
@pytest.mark.parametrize("skew", [-3600.0, 3600.0])
def test_a_holder_elsewhere_is_live_while_its_lock_changes_whatever_its_clock(tmp_path, monkeypatch, skew):
    monkeypatch.setattr(rundir, "STALE_SECONDS", 1.0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / "run.lock"
    lock.write_text(json.dumps(_remote_holder(time.time() + skew)))
    stop = threading.Event()
    renewer = threading.Thread(target=_renewing, args=(lock, _remote_holder(time.time() + skew), stop))
    renewer.start()
    try:
        start = time.monotonic()
        with pytest.raises(
            RunDirBusy, match=r"a live run holds it \(pid 12345 on node-7, started .*\); stop"
        ):
            RunLock(run_dir).acquire()
        assert time.monotonic() - start < 1.0  # known live at its first renewal, not after a wait
    finally:
        stop.set()
        renewer.join()
    assert json.loads(lock.read_text())["token"] == "theirs"


@pytest.mark.fast
@pytest.mark.parametrize("skew", [-3600.0, 3600.0])
def test_a_holder_elsewhere_whose_lock_stays_the_same_is_taken_over(tmp_path, monkeypatch, skew):
    monkeypatch.setattr(rundir, "STALE_SECONDS", 0.5)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.lock").write_text(json.dumps(_remote_holder(time.time() + skew)))
    lock = RunLock(run_dir)
    start = time.monotonic()
    (warning,) = lock.acquire()
    assert time.monotonic() - start >= 0.5  # watched for STALE_SECONDS on this machine's clock
    assert warning.startswith(f"run_dir={run_dir}: took over a stale lock (pid 12345 on node-7, started ")
    assert warning.endswith("its lock did not change in 0.5 s of watching")
    assert json.loads((run_dir / "run.lock").read_text())["token"] == lock.token
    lock.release()
    assert sorted(p.name for p in run_dir.iterdir()) == []


@pytest.mark.fast
def test_the_heartbeat_outlives_passing_io_errors_and_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rundir, "HEARTBEAT_SECONDS", 0.02)
    real_read, failures = rundir._read, []

    def flaky_read(path: Path) -> dict | None:
        if len(failures) < 5:  # an NFS server restarting: ESTALE for a few beats
            failures.append(path)
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_read(path)

    monkeypatch.setattr(rundir, "_read", flaky_read)
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    first = json.loads(lock.path.read_text())["heartbeat"]
    deadline = time.monotonic() + 5
    while json.loads(lock.path.read_text())["heartbeat"] == first and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(failures) == 5 and lock.thread.is_alive()
    assert json.loads(lock.path.read_text())["heartbeat"] > first  # beating again
    lock.release()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "heartbeat failed" in line]
    assert warnings == [
        f"warning: run_dir={tmp_path / 'run'}: the lock's heartbeat failed: [Errno {errno.ESTALE}] Stale file "
        "handle; it keeps trying, and training goes on"
    ]
