"""What a batch is: the contract between data/ (records -> token batches) and fsdp/ (the sharded step).

The two packages never import each other; this module is the only thing they share. data/ makes
`Batch`es of `BatchGeometry`'s shape, with `IGNORE_INDEX` where there is no target; fsdp/ consumes
them, skipping `IGNORE_INDEX` in the loss and counting targets the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (micro_batch, seq) long
    labels: torch.Tensor  # (micro_batch, seq) long, already shifted, -100 = no loss
    position_ids: torch.Tensor | None  # (micro_batch, seq) long; None: 0, 1, ... in every row
    num_target_tokens: int
    num_tokens: int  # non-padding input tokens
    # The whole optimizer step's (target tokens, tokens) over every rank, when the loader knows
    # them on the host (it picks every rank's examples); None: the step counts them with an all-reduce.
    step_totals: tuple[int, int] | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.labels.to(device),
            None if self.position_ids is None else self.position_ids.to(device),
            self.num_target_tokens,
            self.num_tokens,
            self.step_totals,
        )


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
