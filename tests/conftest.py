"""What several test modules share: one spawn of 4 gloo ranks for every 4-rank measurement, and
the guard that keeps the fast tier's marks true.

Four processes take about 10 s to start on 2 cores (each imports torch and transformers), so the
suite's 4-rank jobs (the mesh parity runs, the shard layouts, HSDP's collectives, the model state
per rank) run in one spawn, each job in turn on the same process group.

The fast tier (`make test-fast`, the tests marked `fast`) is the suite minus everything that starts
a process or a process group: no torchrun, no spawned ranks, no subprocess, no gloo. While a test
marked fast runs (its fixtures' set-up and tear-down included), each way this suite starts one
raises StartedInFastTier instead, and the test fails naming what it started, even where the code
under test catches the error. The fake process group (fsdp/fake.py) is let through: it is a
Python object that answers every collective at once, with no process and no socket behind it.
"""

from __future__ import annotations

import _posixsubprocess
import contextlib
import multiprocessing.process
import os
import subprocess
from collections.abc import Callable, Generator, Iterator

import pytest

from tests.helpers import run_distributed

FAST = "fast"


class StartedInFastTier(Exception):
    """A test marked fast started a process or a process group."""


def _is_fake_group(backend: str | None = None, *args, **kwargs) -> bool:
    return backend == "fake"


def _process_starts() -> list[tuple[object, str, str, Callable[..., bool] | None]]:
    """(owner, attribute, what it starts, which calls are let through) for every way the suite
    starts a process or a process group."""
    # All imported before any patching: a module that imported init_process_group by name while
    # the guard was on would keep the refusing stand-in after it.
    import torch.distributed as dist
    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.distributed_c10d as c10d

    group = "a process group (torch.distributed.init_process_group)"
    starts = [
        # subprocess.run, check_output, os.popen and helpers.run (torchrun) all make a Popen.
        (subprocess.Popen, "__init__", "a subprocess (subprocess.Popen)", None),
        # multiprocessing in every start method, torch.multiprocessing, Pools and
        # helpers.run_distributed's spawned ranks all start a Process.
        (multiprocessing.process.BaseProcess, "start", "a process (multiprocessing Process.start)", None),
        # What multiprocessing starts besides: its resource tracker (with a spawn or fork server
        # context's first lock), its fork server.
        (
            _posixsubprocess,
            "fork_exec",
            "a process (multiprocessing's resource tracker or fork server)",
            None,
        ),
        (os, "fork", "a fork of the test process (os.fork)", None),
        (os, "forkpty", "a fork of the test process (os.forkpty)", None),
        (os, "system", "a shell (os.system)", None),
        (os, "posix_spawn", "a process (os.posix_spawn)", None),
        (os, "posix_spawnp", "a process (os.posix_spawnp)", None),
        (dist, "init_process_group", group, _is_fake_group),
        (c10d, "init_process_group", group, _is_fake_group),
        # A device mesh made before any group makes the default group itself.
        (device_mesh, "init_process_group", group, _is_fake_group),
    ]
    return [start for start in starts if hasattr(start[0], start[1])]


def _refusing(
    original: Callable, what: str, allowed: Callable[..., bool] | None, started: list[str]
) -> Callable:
    def refuse(*args, **kwargs):
        if allowed is not None and allowed(*args, **kwargs):
            return original(*args, **kwargs)
        started.append(what)
        raise StartedInFastTier(
            f"a test marked fast started {what}; the fast tier (make test-fast) starts no process "
            "and no process group: take the test out of it (its fast mark or its module's pytestmark)"
        )

    return refuse


@contextlib.contextmanager
def refuse_process_starts(started: list[str]) -> Iterator[None]:
    """Within: every start of a process or of a process group other than the fake one raises
    StartedInFastTier, and what it would have started is appended to `started`."""
    with pytest.MonkeyPatch.context() as patch:
        for owner, name, what, allowed in _process_starts():
            patch.setattr(owner, name, _refusing(getattr(owner, name), what, allowed, started))
        yield


_STARTED = pytest.StashKey[list]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    if item.get_closest_marker(FAST) is None:
        return (yield)
    started = item.stash[_STARTED] = []
    with refuse_process_starts(started):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    started = item.stash.get(_STARTED, [])
    if started:
        said = f"{item.nodeid} is marked fast but started {', '.join(started)} (in its {call.when})"
        # Failed, and said so, also where the code under test caught StartedInFastTier and went on
        # or raised an error of its own in its place.
        report.outcome = "failed"
        if call.excinfo is None:
            report.longrepr = said
        report.sections.append(("fast tier", said))
        started.clear()
    return report


def run_jobs(d, jobs: dict) -> dict:
    """Each job's result on this rank: jobs maps a name to (a module-level function, its arguments)."""
    return {name: fn(d, *args) for name, (fn, args) in jobs.items()}


@pytest.fixture(scope="session")
def four_ranks(tmp_path_factory) -> list[dict]:
    """Every 4-rank job's result, per rank (rank order)."""
    from tests import test_comm, test_memory, test_parity

    jobs = {
        "mesh": (test_parity.world4_scenarios, (str(tmp_path_factory.mktemp("mesh")),)),
        "layouts": (test_comm.layouts, ()),
        "hsdp comm": (test_comm.hsdp_comm_step, ()),
        "model state": (test_memory._measure_all, (test_memory.model_state_jobs(4),)),
    }
    return run_distributed(run_jobs, 4, jobs)
