"""What each training step is measured by: time, throughput, memory and (optionally) communication.

Every step: its phases' wall time (fsdp/step.py), the wait for data, tokens/s, FLOP/s and MFU
(fsdp/flops.py), and the host's (or CUDA's) peak memory. On tracked steps (memory.track: the
first and the last) the memory ledger runs too: each category's bytes beside the analytic model,
printed, in TensorBoard and in memory.json. With comm.track, every collective's bytes per kind
and FSDP unit, beside the theory (fsdp/comm.py). All of it goes through one MetricsLogger row.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from batch import Batch
from durable import write_json
from fsdp import comm, memory
from fsdp.build import compile_seconds
from fsdp.dist import Dist, from_every_rank
from fsdp.flops import Throughput
from fsdp.layout import describe_units
from fsdp.metrics import MetricsLogger
from fsdp.step import StepStats


@dataclass(frozen=True)
class InstrumentSettings:
    log_every: int = 1
    track_memory: bool = False  # the ledger on the first and the last step
    memory_all_ranks: bool = False  # print every rank's table, not only rank 0's
    snapshot: bool = False  # cuda: an allocator snapshot of the first step
    track_comm: bool = False  # bytes of every collective, beside the theory (fsdp/comm.py)
    precision: str = "mixed"  # the theory's dtypes
    reduce_dtype: str | None = None
    grad_accum_steps: int = 1
    reduce_grads_every_microbatch: bool = False
    compile: bool = False  # report the seconds each step spent compiling, when there are any


@dataclass
class StepMeasurements:
    """One step's measurements, filled in as the step runs."""

    step: int
    micro_batches: list[Batch]
    data_wait: float  # seconds the loop waited for this step's micro-batches
    start: float = 0.0
    seconds: float = 0.0
    memory: memory.StepMemory | None = None
    comm: comm.CommTracker | None = None
    compile_seconds: float = 0.0  # of `seconds`, spent compiling


class StepInstruments:
    """Around each step of the loop: `with instruments.step(n, micro_batches, data_wait) as measured:
    train_step(...)`, then `instruments.log(measured, stats, lr)`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        distributed: Dist,
        vocab_size: int,
        throughput: Throughput,
        predicted: dict,
        settings: InstrumentSettings,
        total_steps: int,
        run_dir: Path,
        metrics: MetricsLogger,
    ):
        self.model, self.optimizer, self.distributed = model, optimizer, distributed
        self.vocab_size = vocab_size
        self.throughput, self.predicted = throughput, predicted
        self.settings, self.total_steps, self.run_dir, self.metrics = settings, total_steps, run_dir, metrics
        # The ledger slows a step down: only the first and the last step run under it.
        self.tracked = {1, total_steps} if settings.track_memory else set()
        self.ledgers: dict[str, dict] = {}
        self.losses = list(metrics.previous_losses)  # every step's, a resumed run's earlier ones first
        # What each step's collectives should move, from the shard layout (comm.track only).
        self.comm_theory = {}
        if settings.track_comm:
            self.comm_theory = comm.theory_for(
                describe_units(model, distributed.shard_size, settings.precision),
                world_size=distributed.shard_size,
                micro_batches=settings.grad_accum_steps,
                precision=settings.precision,
                reduce_every_microbatch=settings.reduce_grads_every_microbatch,
                reduce_dtype=settings.reduce_dtype,
                replicate=distributed.replicas,
            )

    @contextmanager
    def step(self, step: int, micro_batches: list[Batch], data_wait: float) -> Iterator[StepMeasurements]:
        """Time and track what runs inside: the step on these micro-batches."""
        measured = StepMeasurements(step, micro_batches, data_wait)
        measured.start = time.perf_counter()
        compiled_before = compile_seconds() if self.settings.compile else 0.0
        snapshot = self.settings.snapshot and step == 1
        measured.memory = memory.StepMemory(
            self.model,
            self.optimizer,
            vocab_size=self.vocab_size,
            distributed=self.distributed,
            micro_batches=measured.micro_batches,
            track=step in self.tracked,
            snapshot=self.run_dir / f"memory_snapshot_rank{self.distributed.rank}.pickle"
            if snapshot
            else None,
        )
        with ExitStack() as trackers:
            trackers.enter_context(measured.memory)
            if self.settings.track_comm:
                measured.comm = trackers.enter_context(
                    comm.CommTracker(self.model, self.distributed.world_size)
                )
            yield measured
        measured.seconds = time.perf_counter() - measured.start
        measured.compile_seconds = compile_seconds() - compiled_before if self.settings.compile else 0.0

    def log(self, measured: StepMeasurements, stats: StepStats, lr: float) -> None:
        """The step's row (every log_every steps, the last and tracked ones) and its reports."""
        seconds = measured.seconds
        self.losses.append(stats.loss)
        scalars = {
            "train/loss": stats.loss,
            "train/lr": lr,
            "train/grad_norm": stats.grad_norm,
            "train/tokens_per_s": stats.tokens / seconds,
            "train/target_tokens": stats.target_tokens,
            "train/skipped": float(not stats.finite),
            **self.throughput.scalars(measured.micro_batches, seconds),
            "time/step_s": seconds,
            "time/data_wait_s": measured.data_wait,
            **{f"time/{phase}_s": t for phase, t in stats.seconds.items()},
            **measured.memory.scalars(),
        }
        if measured.compile_seconds > 0.1:  # the first step, and any new input shape
            scalars["time/compile_s"] = measured.compile_seconds
            self.metrics.write(
                f"compile: {measured.compile_seconds:.1f} s of step {measured.step}'s {seconds:.1f} s went to "
                "torch.compile (once per input shape; the later steps run the compiled layers)"
            )
        if measured.comm is not None:
            scalars.update(comm.step_scalars(measured.comm.ledger))
            self.metrics.write(comm.step_line(measured.step, measured.comm.ledger, self.comm_theory))
        tracked = measured.memory.ledger is not None
        if measured.step % self.settings.log_every == 0 or measured.step == self.total_steps or tracked:
            self.metrics.log(measured.step, scalars)
        if tracked:
            self.ledgers[f"step {measured.step}"] = measured.memory.result()
            self.report_memory()

    def report_memory(self) -> None:
        """Each rank's ledgers so far beside the prediction: printed (rank 0, or all), and memory.json."""
        rank, is_main = self.distributed.rank, self.distributed.is_main
        everyone = from_every_rank(self.ledgers)
        all_ranks = self.settings.memory_all_ranks
        text = memory.report(self.predicted, everyone[rank], f"memory of rank {rank} (GiB)")
        if all_ranks and not is_main:
            print(text, flush=True)
        elif is_main:
            self.metrics.write(text)
        if is_main:
            record = {"analytic": self.predicted, "ranks": everyone}
            write_json(self.run_dir / "memory.json", record)
