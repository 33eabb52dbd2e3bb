"""The run folder as a whole: one live run writes it at a time, a finished run stays finished, and
a run removes only what runs write.

The lock is a file, `run_dir/run.lock`: the holder's host, pid, start time and a heartbeat that
rank 0 renews every few seconds while the run lives. It is created with a hard link (atomic on
local disks and on NFS, unlike flock, which a filesystem shared by several nodes may not honour),
so of two runs starting at once exactly one gets it. A lock is live while its holder is: on the
same machine, while its process exists; from another machine, while its heartbeat keeps changing
(watched on this machine's own clock for up to STALE_SECONDS; the two machines' clocks are never
compared). A dead holder's lock is taken over, with a warning; a live one refuses the second run,
overwrite=true or not.

RUN_WRITES names everything a run writes at the top of run_dir. A run_dir holding anything else
(a user's files, a checkout, a home folder) is refused before the run starts, and overwrite=true
removes only those names.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from durable import write_atomic, write_json
from fsdp.dist import from_every_rank, from_main, proc_stat
from fsdp.stop import Stop

if TYPE_CHECKING:  # fsdp/export.py imports the checkpoints, which import this module
    from fsdp.export import ExportTarget

LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 2.0
STALE_SECONDS = 60.0
WARN_EVERY_SECONDS = 60.0  # a heartbeat that keeps failing says so at most this often

# Every file a run writes whole at the top of run_dir (durable.write_atomic, or an AppendLog).
RUN_FILES = (
    "config.yaml",  # start_writing, below
    "metrics.jsonl",  # fsdp/metrics.py
    "summary.json",  # fsdp/metrics.py
    "eval.json",  # fsdp/evaluate.py
    "generations.json",  # fsdp/evaluate.py
    "generations.md",  # fsdp/evaluate.py
    "memory.json",  # fsdp/instruments.py (memory.track)
    "memory_snapshot_rank*.pickle",  # fsdp/instruments.py (memory.snapshot, cuda)
    LOCK_NAME,  # RunLock
)
# Every folder a run writes at the top of run_dir.
RUN_FOLDERS = (
    "checkpoints",  # fsdp/checkpoint.py: step-N, step-N.tmp, step-N.deleting all live inside it
    "tensorboard",  # fsdp/metrics.py
    "model",  # the export (config/settings.py export_target); written as model.tmp, the old one set
    "model.tmp",  # aside as model.old while the new one takes its name (durable.publish_folder)
    "model.old",
)
# Every name a run writes at the top of run_dir, as globs: the files, the folders, and the
# temporary names a killed run can leave (write_atomic's `.NAME.tmp-HOST-PID`, the lock's own
# `.run.lock.new-TOKEN` and `.run.lock.stale-TOKEN`). overwrite=true removes these and nothing
# else, and a run_dir holding anything else is refused (run_dir_problem): files a user put there
# are never a run's to delete. A new file a run writes into run_dir is named here; a test
# (tests/test_rundir.py) finds each name the code joins to run_dir and checks it is.
RUN_WRITES = (
    *RUN_FILES,
    *RUN_FOLDERS,
    *(f".{name}.tmp-*" for name in RUN_FILES),
    f".{LOCK_NAME}.new-*",
    f".{LOCK_NAME}.stale-*",
)
# An NFS client renames a file that is replaced or removed while another process holds it open
# (the lock, read by a second launch as a heartbeat replaces it) to `.nfsXXXX` until it is closed:
# the run's own file on its way out, neither a user's nor a name to remove (the server refuses).
NFS_SILLY_RENAME = ".nfs"
# The checkout: train.py's folder. Its own files are no run's.
CHECKOUT = Path(__file__).resolve().parent.parent


def run_writes(name: str) -> bool:
    """Whether an entry of this name at the top of run_dir is one a run writes."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_WRITES)


def _shown(entry: Path) -> str:
    return entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else "")


def run_dir_problem(run_dir: Path) -> str | None:
    """Why `run_dir` cannot be a run folder, in one line; None when it can. Reads, writes nothing.

    The root, the user's home folder, the checkout and any git work tree (a folder holding .git)
    are never run folders; an existing run_dir may hold only what runs write (RUN_WRITES), so
    that overwrite=true, which removes a previous run, can never remove anything else.
    """
    run_dir = Path(run_dir)
    where = run_dir.resolve()
    home = os.path.expanduser("~")
    never = {
        Path(where.anchor): "the file system's root",
        CHECKOUT: "fulltune's checkout",
    }
    if home != "~":
        never[Path(home).resolve()] = "your home folder"
    reason = never.get(where)
    if reason is None and (where / ".git").exists():
        reason = "a git work tree"
    if reason:
        return (
            f"run_dir={run_dir} is {reason}, never a run folder: choose a folder of its own (e.g. runs/NAME)"
        )
    if run_dir.exists() and not run_dir.is_dir():
        return f"run_dir={run_dir} is a file, not a folder: choose another run_dir"
    if not run_dir.is_dir():
        return None
    foreign = sorted(
        _shown(entry)
        for entry in run_dir.iterdir()
        if not run_writes(entry.name) and not entry.name.startswith(NFS_SILLY_RENAME)
    )
    if not foreign:
        return None
    listed = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
    return (
        f"run_dir={run_dir} holds files no run writes ({listed}); fulltune removes only a run's own "
        "files with overwrite=true: move them or choose another run_dir"
    )


class RunDirBusy(Stop):
    """Another live run holds the run folder; the message names it."""


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # unreadable: no holder can be named, none is alive
    return value if isinstance(value, dict) else {}


def this_machine() -> dict[str, str]:
    """What tells two processes apart as being on one machine: host, boot and pid namespace."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return {
        "host": socket.gethostname(),
        "boot": boot.read_text().strip() if boot.is_file() else "",
        "pid namespace": namespace,
    }


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux), or None if it is not running.
    A zombie counts as gone; a pid reused by another process shows another start."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # someone else's process: it exists
    fields = proc_stat(pid)
    if fields is None:
        return "unknown"  # no /proc: existing is all we know
    return None if fields[0] == "Z" else fields[19]


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {started}"
    if holder.get("machine") == this_machine():  # one clock wrote and reads it: the age is real
        text += f", last heartbeat {time.time() - holder.get('heartbeat', 0):.0f} s ago"
    return text


def why_dead(holder: dict, path: Path) -> str | None:
    """None if the holder of the lock at `path` (read as `holder`) is alive; otherwise why it is not.
    A holder on another machine is watched for up to STALE_SECONDS."""
    if not holder:
        return "the lock file is unreadable"
    if holder.get("machine") == this_machine():
        start = process_start(holder["pid"])
        if start is None:
            return "its process is gone"
        if start not in ("unknown", holder.get("process start")):
            return "its pid now belongs to another process"
        return None
    # Another machine: its recorded heartbeat is its clock, and ours may differ by minutes (no NTP,
    # a drifting VM); the lock file's mtime is no better, since some shared filesystems (Lustre,
    # GPFS) stamp it with the writer's clock. So the only clock used is ours, and monotonic: the
    # holder is alive if its lock file changes while we watch, dead if it stays the same for
    # STALE_SECONDS. A live holder shows itself within a heartbeat or two; only taking over a dead
    # one waits the whole STALE_SECONDS.
    start = time.monotonic()
    deadline, said = start + STALE_SECONDS, False
    while True:
        with contextlib.suppress(OSError):  # a passing NFS error (ESTALE): look again
            if _read(path) != holder:
                return None  # renewed, released or taken by another run: not ours to take
        now = time.monotonic()
        if now >= deadline:
            return f"its lock did not change in {STALE_SECONDS:g} s of watching"
        if not said and now - start > 2 * HEARTBEAT_SECONDS + 1:
            print(
                f"run_dir={path.parent}: the lock of {describe(holder)} has not changed for "
                f"{now - start:.0f} s; watching it up to {STALE_SECONDS:g} s before taking it over",
                file=sys.stderr,
                flush=True,
            )
            said = True
        time.sleep(min(0.5, deadline - now))


class RunLock:
    """Rank 0's hold on a run folder: `acquire`, a heartbeat thread while held, `release`."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.created_dir = False
        self.started = time.time()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def content(self, started: float) -> dict:
        pid = os.getpid()
        return {
            "host": socket.gethostname(),
            "pid": pid,
            "started": started,
            "heartbeat": time.time(),
            "token": self.token,
            "machine": this_machine(),
            "process start": process_start(pid),
        }

    def acquire(self) -> list[str]:
        """Take the lock, or raise RunDirBusy naming the live holder. Returns warnings (takeovers)."""
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        warnings = []
        for _ in range(5):
            if self._create():
                self.thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
                self.thread.start()
                return warnings
            holder = _read(self.path)
            if holder is None:
                continue  # released meanwhile
            reason = why_dead(holder, self.path)
            if reason is None:
                holder = _read(self.path)  # as it is now: renewed, or taken by another run
                if holder is None:
                    continue
                raise RunDirBusy(
                    f"run_dir={self.run_dir}: a live run holds it ({describe(holder)}); stop that run "
                    f"first, or choose another run_dir (its lock: {self.path})"
                )
            # Set the dead lock aside by rename: of two runs taking it over at once, one rename wins.
            aside = self.path.with_name(f".{LOCK_NAME}.stale-{self.token}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            moved = _read(aside) or {}
            if moved != holder:  # renewed or taken just before the rename: not the dead lock, put it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
            else:
                warnings.append(
                    f"run_dir={self.run_dir}: took over a stale lock ({describe(holder)}): {reason}"
                )
            aside.unlink(missing_ok=True)
        raise RunDirBusy(f"run_dir={self.run_dir}: could not take {self.path}: other runs keep taking it")

    def _create(self) -> bool:
        """Create the lock file whole, or return False if one exists."""
        tmp = self.path.with_name(f".{LOCK_NAME}.new-{self.token}")
        write_json(tmp, self.content(self.started))
        try:
            os.link(tmp, self.path)  # fails if the lock exists; the file appears with its content
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then the content
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            os.close(fd)
            os.replace(tmp, self.path)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _beat(self) -> None:
        failures, warned = 0, None
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            try:
                holder = _read(self.path)
                if holder is not None and holder.get("token") != self.token:
                    # Another run judged this one dead (a machine suspended past STALE_SECONDS):
                    # two runs must never write one folder, and the other one holds it now.
                    os.write(
                        2,
                        f"run_dir={self.run_dir}: the lock was taken over ({describe(holder)}); stopping\n".encode(),
                    )
                    os._exit(1)
                write_json(self.path, self.content(self.started))
            except OSError as err:
                # A network filesystem's passing error (ESTALE, EIO), a full disk: this beat is
                # missed, the next one tries again. Ending the thread instead would stop the
                # heartbeat for good and let a second run take over this live one. Said once,
                # then at most every WARN_EVERY_SECONDS, not every beat.
                failures += 1
                if warned is None or time.monotonic() - warned >= WARN_EVERY_SECONDS:
                    times = f" ({failures} beats since the last warning)" if failures > 1 else ""
                    print(
                        f"warning: run_dir={self.run_dir}: the lock's heartbeat failed{times}: {err}; "
                        "it keeps trying, and training goes on",
                        file=sys.stderr,
                        flush=True,
                    )
                    failures, warned = 0, time.monotonic()

    def release(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        holder = _read(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink()
        if self.created_dir and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()  # a run that stopped before writing anything leaves no folder


@contextmanager
def held_run_dir(run_dir: Path, is_main: bool) -> Iterator[None]:
    """`with held_run_dir(run_dir, is_main):` rank 0 holds the lock for the block, and every rank
    raises the same RunDirBusy if another live run holds it, or if some rank does not see rank 0's
    lock in its run_dir (not one shared folder). Takeover warnings go to stderr."""
    lock, error = RunLock(run_dir) if is_main else None, None
    if lock is not None:
        try:
            for warning in lock.acquire():
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        except RunDirBusy as err:
            lock, error = None, str(err)
    together = dist.is_initialized() and dist.get_world_size() > 1
    token = lock.token if lock is not None else None
    if together:  # rank 0 decides for every rank
        error, token = from_main((error, token))
    if error:
        raise RunDirBusy(error)
    try:
        if together:
            check_shared(Path(run_dir), token)
        yield
    finally:
        if lock is not None:
            lock.release()


def check_shared(run_dir: Path, token: str, patience: float = 5.0) -> None:
    """Every rank reads rank 0's lock and finds its token (a nonce): run_dir is one folder for all.

    A node-local run_dir would leave each node its own checkpoints, half of each checkpoint's files
    and ranks that disagree on what to resume (a hang). A network filesystem may cache a directory
    listing for a few seconds, so a rank looks again for up to `patience` seconds before it says no.
    """
    deadline = time.monotonic() + patience
    while not (seen := (_read(run_dir / LOCK_NAME) or {}).get("token") == token):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    views = from_every_rank((seen, socket.gethostname()))
    blind = [(rank, host) for rank, (ok, host) in enumerate(views) if not ok]
    if blind:
        who = ", ".join(f"rank {rank} on {host}" for rank, host in blind[:4])
        raise RunDirBusy(
            f"run_dir={run_dir} is not one folder shared by every rank: {who}"
            f"{' and others' if len(blind) > 4 else ''} cannot see the lock rank 0 "
            f"({views[0][1]}) wrote in it; put run_dir on storage every node mounts (the checkout "
            "and the caches may be per node)"
        )


def finished_run(run_dir: Path, checkpoint_meta: dict | None, length: dict) -> dict | None:
    """summary.json of a run that is over, or None: the checkpoint resumed is its final one (its
    step is the run's last, `length` (epochs, max_steps) unchanged) and summary.json, written
    last, records that step."""
    meta = checkpoint_meta or {}
    if "total_steps" not in meta or meta["total_steps"] != meta["step"]:
        return None
    if {k: meta.get("config", {}).get("train", {}).get(k) for k in length} != length:
        return None  # asked to train longer (or shorter): not the same run's end
    summary = _read(Path(run_dir) / "summary.json")
    if dist.is_initialized():
        summary = from_main(summary)  # rank 0 reads it for everyone: one decision
    return summary if summary and summary.get("steps") == meta["step"] else None


def close_finished_run(
    run_dir: Path, checkpoint: Path, step: int, export: ExportTarget | None, is_main: bool
) -> None:
    """resume=auto on a finished run: say so and where its model is. If the export is missing or
    torn, write it again from the final checkpoint, and nothing else."""
    if is_main:
        from fsdp.export import export_checkpoint, export_problem

        problem = export_problem(export.folder) if export else None
        if problem:
            print(f"export: {problem}; exporting again from {checkpoint}", flush=True)
            export_checkpoint(checkpoint, export.folder, export.dtype, export.max_shard_bytes)
        where = f"the model is in {export.folder}" if export else f"its final checkpoint is {checkpoint}"
        print(f"done: run_dir={run_dir} finished at step {step}; {where}", flush=True)
    if dist.is_initialized():
        dist.barrier()


def clear_previous_run(run_dir: Path) -> list[str]:
    """overwrite=true, a fresh start: remove what the previous run left in run_dir (its checkpoints,
    logs, summary, its export), so none of it is mixed with the new run's: keep_last would sort both
    runs' checkpoints together, and resume=auto could resume the old one. Only names in RUN_WRITES
    go (validate() refused a run_dir holding others; one added since stays), and a symbolic link is
    removed itself, never what it points to. Called by rank 0 once the new run is ready to write
    (data and model loaded), so a run that fails before that leaves the old one whole. Returns the
    names removed, and says them."""
    removed = []
    for entry in sorted(Path(run_dir).iterdir()) if Path(run_dir).is_dir() else []:
        if entry.name == LOCK_NAME or not run_writes(entry.name):
            continue
        removed.append(_shown(entry))
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)  # never follows a link inside the tree: it removes the link
        else:
            entry.unlink()
    if removed:
        print(f"overwrite=true: removed the previous run's {', '.join(removed)} from {run_dir}", flush=True)
    return removed


def start_writing(run_dir: Path, config_yaml: str, clear: bool) -> None:
    """Rank 0's first write into run_dir: config.yaml, after clearing the previous run if asked."""
    if clear:
        clear_previous_run(run_dir)
    write_atomic(Path(run_dir) / "config.yaml", config_yaml)
