"""What several test modules share: one spawn of 4 gloo ranks for every 4-rank measurement.

Four processes take about 10 s to start on 2 cores (each imports torch and transformers), so the
suite's 4-rank jobs (the mesh parity runs, the shard layouts, HSDP's collectives, the model state
per rank) run in one spawn, each job in turn on the same process group.
"""

from __future__ import annotations

import pytest

from tests.helpers import run_distributed


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
