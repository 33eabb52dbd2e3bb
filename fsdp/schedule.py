"""Learning-rate schedule and the batch geometry of one optimizer step.

Full fine-tuning wants gentle nudges: a short linear warmup from zero (AdamW's second moment is
still a poor estimate in the first steps), then a decay to a floor, so the last steps barely move
the weights the model came with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        floor = self.peak_lr * self.min_lr_ratio
        decay_steps = max(1, self.total_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.decay == "constant":
            return self.peak_lr
        if self.decay == "linear":
            return floor + (self.peak_lr - floor) * (1 - progress)
        if self.decay == "cosine":
            return floor + (self.peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        raise ValueError(f"schedule.decay={self.decay}: must be cosine, linear or constant")


def warmup_steps(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return min(total_steps, math.ceil(total_steps * warmup_ratio))


@dataclass(frozen=True)
class BatchGeometry:
    """micro_batch_size x grad_accum_steps x world_size = sequences per optimizer step."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    max_seq_length: int

    @property
    def per_rank_sequences(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    @property
    def global_sequences(self) -> int:
        return self.per_rank_sequences * self.world_size

    @property
    def global_max_tokens(self) -> int:
        return self.global_sequences * self.max_seq_length

    def describe(self) -> str:
        return (
            f"{self.micro_batch_size} seq/micro-batch x {self.grad_accum_steps} accumulation x "
            f"{self.world_size} ranks = {self.global_sequences} sequences "
            f"(<= {self.global_max_tokens:,} tokens) per optimizer step"
        )
