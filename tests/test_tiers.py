"""The test tiers: `make test` runs every test, `make test-fast` the ones marked fast. The marks
are checked both ways: tests/conftest.py fails a fast test that starts a process or a process
group, and the tests here fail when a part the fast tier is for has no fast test, or when the
guard lets a start through."""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pkgutil
import subprocess
import sys

import pytest

import tests
from tests.conftest import FAST, StartedInFastTier, refuse_process_starts
from tests.helpers import run, run_distributed

pytestmark = pytest.mark.fast  # every test here runs in this process: the fast tier (make test-fast)

# What the fast tier is for: each part, and the module that tests it or its one test (module::test).
FAST_PARTS = {
    "config": "test_config",
    "config ranges": "test_config_ranges",
    "data": "test_data",
    "packing": "test_packing_and_pipeline",
    "schedule and loss": "test_schedule_and_loss",
    "durable writes": "test_durable",
    "the README-command table": "test_readme::test_every_readme_command_is_run_by_a_test",
}


def is_fast(module, test) -> bool:
    """Whether the test carries the fast mark, itself or through its module's pytestmark."""
    marks = []
    for holder in (module, test):
        found = getattr(holder, "pytestmark", [])
        marks += found if isinstance(found, list) else [found]
    return any(mark.name == FAST for mark in marks)


def fast_by_module() -> dict[str, dict[str, bool]]:
    """Each test module's tests -> whether each is in the fast tier."""
    found = {}
    for module_info in pkgutil.iter_modules(tests.__path__):
        if module_info.name.startswith("test_"):
            module = importlib.import_module(f"tests.{module_info.name}")
            found[module_info.name] = {
                name: is_fast(module, test)
                for name, test in vars(module).items()
                if name.startswith("test_") and callable(test)
            }
    return found


def test_every_part_the_fast_tier_is_for_has_fast_tests():
    found = fast_by_module()
    missing = []
    for part, where in FAST_PARTS.items():
        module, _, test = where.partition("::")
        marked = found.get(module, {})
        if test and not marked.get(test, False):
            missing.append(f"{part}: {where} is not marked fast")
        elif not test and not any(marked.values()):
            missing.append(f"{part}: {where} has no test marked fast")
    assert not missing, "\n".join(missing)


def test_the_fast_mark_is_registered(request):
    # --strict-markers (pyproject.toml) makes a misspelt mark an error instead of a test left out.
    assert any(line.startswith(f"{FAST}:") for line in request.config.getini("markers"))
    assert "--strict-markers" in request.config.getini("addopts")


def _never_runs() -> None:
    raise AssertionError("a process started under the guard")


def test_the_guard_refuses_each_way_the_suite_starts_a_process():
    """Each start is refused before anything runs: nothing here starts for real, guard or no guard."""
    import torch.distributed as dist

    starts = {
        "torchrun (helpers.run)": lambda: run(["preset=no-such-preset"], nproc=2),
        "spawned gloo ranks (helpers.run_distributed)": lambda: run_distributed(_never_runs, 2),
        "subprocess.run": lambda: subprocess.run([sys.executable, "-c", "pass"], check=True),
        "a fork server's Pool (data.dataset's tokenizing)": lambda: mp.get_context("forkserver").Pool(1),
        "os.system": lambda: os.system("true"),
        "a gloo process group in this process": lambda: dist.init_process_group(
            "gloo", store=dist.HashStore(), rank=0, world_size=1
        ),
    }
    for what, start in starts.items():
        started: list[str] = []
        with refuse_process_starts(started), pytest.raises(StartedInFastTier):
            start()
        assert len(started) == 1, (what, started)
    assert not dist.is_initialized()


def test_the_guard_lets_the_fake_process_group_through():
    """Fake tensors' estimates stay in the fast tier: the fake group starts no process."""
    import torch.distributed as dist

    from fsdp.fake import fake_process_group

    started: list[str] = []
    with refuse_process_starts(started), fake_process_group(8) as fake:
        assert fake.world_size == 8 and dist.is_initialized()
    assert started == [] and not dist.is_initialized()
