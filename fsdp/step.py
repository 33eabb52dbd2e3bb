"""One optimizer step: accumulate micro-batches, one gradient reduction, clip, AdamW, and its timing.

The loss of a step is the token-weighted mean over the *global* batch: each micro-batch's summed
token loss is divided by the target-token count of the whole step, over every rank. So k
micro-batches of b sequences equal one batch of k*b exactly, and N ranks equal one process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from batch import Batch
from fsdp import faults
from fsdp.fake import host_float

PHASES = ("forward", "backward", "optimizer")


@dataclass
class StepStats:
    loss: float  # token-weighted mean over the global batch
    grad_norm: float  # before clipping
    target_tokens: int  # global
    tokens: int  # global, non-padding
    finite: bool = True  # False: loss or gradient norm was NaN/Inf and the optimizer did not step
    seconds: dict[str, float] | None = None  # forward, backward, optimizer (clip + step + zero)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[Batch],
    max_grad_norm: float | None = None,
    reduce_grads_every_microbatch: bool = False,
) -> StepStats:
    """One optimizer step over this rank's micro-batches; every rank calls it with the same count."""
    # The loss denominator is the target-token count of the whole step, over every rank, so every
    # rank divides by the same number: the loader knows it on the host; otherwise (a caller's own
    # batches) it is counted and all-reduced before the first forward.
    device = micro_batches[0].input_ids.device  # NCCL reduces only tensors on the GPU
    if micro_batches[0].step_totals is not None:
        global_targets, global_tokens = micro_batches[0].step_totals
    else:
        local_counts = [
            sum(b.num_target_tokens for b in micro_batches),
            sum(b.num_tokens for b in micro_batches),
        ]
        counts = torch.tensor(local_counts, device=device)
        dist.all_reduce(counts)
        global_targets, global_tokens = (int(host_float(c, placeholder=1)) for c in counts)

    clock = PhaseClock(device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for i, batch in enumerate(micro_batches):
        is_last = i == len(micro_batches) - 1
        # Gradients are reduce-scattered once, after the last micro-batch; before that each rank
        # accumulates its unsharded gradients locally (memory for communication).
        model.set_requires_gradient_sync(is_last or reduce_grads_every_microbatch)
        micro_loss_sum = faults.loss(model(batch.input_ids, batch.position_ids, batch.labels), i)
        clock.lap("forward")
        (micro_loss_sum / max(global_targets, 1)).backward()
        clock.lap("backward")
        loss_sum += micro_loss_sum.detach().float()
        faults.point("micro", i)

    # Gradients of every shard, one global norm: clip_grad_norm_ all-reduces the squared norms.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    dist.all_reduce(loss_sum)
    loss = host_float(loss_sum, placeholder=0.0) / max(global_targets, 1)  # fake tensors: no value
    norm = host_float(grad_norm, placeholder=0.0)
    # A NaN or Inf anywhere reaches every rank through these two reductions: all ranks agree to
    # skip the update, which would otherwise write NaN into every parameter and moment.
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clock.lap("optimizer")
    return StepStats(loss, norm, global_targets, global_tokens, finite, clock.seconds)


class PhaseClock:
    """Wall time per phase of a step, without stalling the device.

    On CPU a lap reads the clock. On a GPU the host only queues kernels, so a lap records a CUDA
    event in the stream instead of waiting (a wait per phase, 32 a step in an 8B recipe, would stop
    the CPU from running ahead); `seconds` reads the events once, when the step has already waited
    for its loss. A phase is charged from the end of the previous one to its last kernel.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._laps: list[tuple[str, object]] = []
        self.last = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            self.last.record()

    def lap(self, phase: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._laps.append((phase, event))
            return
        now = time.perf_counter()
        self._seconds[phase] += now - self.last
        self.last = now

    @property
    def seconds(self) -> dict[str, float]:
        if self._laps:
            self._laps[-1][1].synchronize()
            previous = self.last
            for phase, event in self._laps:
                self._seconds[phase] += previous.elapsed_time(event) / 1000
                previous = event
            self._laps, self.last = [], previous
        return self._seconds


class NonFiniteStep(RuntimeError):
    """A step whose loss or gradient norm was NaN/Inf, under train.on_nonfinite=stop."""


def check_finite(
    stats: StepStats, step: int, *, position: dict, steps_per_epoch: int, policy: str
) -> str | None:
    """None for a finite step; for a non-finite one, `skip` returns a line for the log, `stop` raises.

    The update was not applied (train_step): the model is still the last good one either way.
    """
    if stats.finite:
        return None
    where = (
        f"step {step}: loss {stats.loss}, gradient norm {stats.grad_norm}, on the data of epoch "
        f"{position['epoch'] + 1}, batch {position['step_in_epoch']} of {steps_per_epoch}"
    )
    if policy == "stop":
        raise NonFiniteStep(where)
    return f"skipped non-finite {where} (train.on_nonfinite=skip)"
