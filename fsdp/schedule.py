"""Learning-rate schedule of the optimizer steps.

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
