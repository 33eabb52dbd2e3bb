"""Faults on purpose, for the tests of checkpointing and resume: a run that dies where a test says.

A fault is armed by the environment variable FULLTUNE_FAULT, comma-separated key=value pairs:

    action=kill,at=step,step=3,rank=1            SIGKILL rank 1 as step 3 starts (before its forward)
    action=kill,at=micro,step=3,micro=1          ... after micro-batch 1 of step 3 (mid-accumulation)
    action=kill,at=save,step=4                   ... while checkpoint 4 is written, before it is complete
    action=kill,at=delete,step=4                 ... while an older checkpoint is deleted after checkpoint 4
    action=nan,at=micro,step=2,micro=0           micro-batch 0 of step 2 returns a NaN loss

`rank` (default: every rank) picks the rank; `attempt` (default 0) the torchrun restart
(TORCHELASTIC_RESTART_COUNT) it fires on, so a restarted group does not die again. Unset, every
call here is a no-op. Steps are numbered from 1, as in the logs.
"""

from __future__ import annotations

import os
import signal

import torch

_current_step = 0


def _armed() -> dict[str, str]:
    spec = os.environ.get("FULLTUNE_FAULT", "")
    return dict(item.split("=", 1) for item in spec.split(",") if "=" in item)


def _fires(fault: dict[str, str], at: str, micro: int | None = None) -> bool:
    return (
        fault.get("at") == at
        and int(fault.get("step", -1)) == _current_step
        and (micro is None or int(fault.get("micro", -1)) == micro)
        and fault.get("rank", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")
        and fault.get("attempt", "0") == os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    )


def begin_step(step: int) -> None:
    """The loop announces step `step` (1-based); a kill armed for its start fires here."""
    global _current_step
    _current_step = step
    point("step")


def point(at: str, micro: int | None = None) -> None:
    """A place a run may be killed: `at` is step, micro, save or delete."""
    fault = _armed()
    if fault.get("action") == "kill" and _fires(fault, at, micro):
        os.kill(os.getpid(), signal.SIGKILL)


def loss(value: torch.Tensor, micro: int) -> torch.Tensor:
    """The micro-batch's loss, or NaN where a fault says so."""
    fault = _armed()
    if fault.get("action") == "nan" and _fires(fault, "micro", micro):
        return value * float("nan")
    return value
