"""Deterministic, distributed batches: every rank gets its own slice of the same global batch.

Each epoch is a permutation of the examples drawn from (seed, epoch). An optimizer step takes
the next `global_sequences` examples of that permutation; micro-step k of rank r takes slice
(k * world_size + r). So the set of examples in a global batch depends on the seed and the global
batch size only, not on how it is split into ranks and micro-batches. The incomplete last global
batch of an epoch is dropped, so every step has the same geometry.

The interface to the training step is `Batch` (batch.py): input_ids, labels, position_ids, and
the count of target tokens. Sequences are right-padded to the longest in the micro-batch; the
padding has label -100, and since attention is causal no real token attends to it. Packed
examples (data/packing.py) bring their own position ids, which restart at each document; unpacked
batches carry none (the model counts 0, 1, ... itself, and does not inspect them for restarts).
Every micro-batch also carries its step's target-token total over all ranks, known here on the
host, so the step needs no collective to learn its loss denominator.
"""

from __future__ import annotations

import numpy as np
import torch

from batch import IGNORE_INDEX, Batch, BatchGeometry
from data.tokens import Sequences


def collate(examples: list[dict], pad_id: int) -> Batch:
    """Right-padded micro-batch of examples (input_ids, labels, and position_ids when packed; lists
    or arrays)."""
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    packed = any("position_ids" in e for e in examples)
    # Padding continues the last document's positions, so it never looks like a new packed document.
    position_ids = torch.arange(length).expand(len(examples), length).clone() if packed else None
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.as_tensor(np.asarray(e["input_ids"], dtype=np.int64))
        labels[i, :n] = torch.as_tensor(np.asarray(e["labels"], dtype=np.int64))
        if "position_ids" in e:  # packed: positions restart at each document
            last = int(e["position_ids"][-1])
            position_ids[i, :n] = torch.as_tensor(np.asarray(e["position_ids"], dtype=np.int64))
            position_ids[i, n:] = torch.arange(last + 1, last + 1 + length - n)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        num_target_tokens=int((labels != IGNORE_INDEX).sum()),
        num_tokens=sum(len(e["input_ids"]) for e in examples),
    )


class DistributedBatchLoader:
    """Yields, for this rank, the `grad_accum_steps` micro-batches of each optimizer step.

    It holds the training sequences as index arrays into memory-mapped tokens (data/tokens.py) and
    reads the tokens of this rank's micro-batches only; the step's totals over all ranks come from
    per-sequence counts. A list of example dicts (tests, small sets) is laid out as arrays first."""

    def __init__(
        self, sequences: Sequences | list[dict], geometry: BatchGeometry, rank: int, seed: int, pad_id: int
    ):
        self.sequences = Sequences.from_examples(sequences) if isinstance(sequences, list) else sequences
        self.geometry = geometry
        self.rank = rank
        self.seed = seed
        self.pad_id = pad_id
        self.steps_per_epoch = len(self.sequences) // geometry.global_sequences
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data: {len(self.sequences)} examples do not fill one global batch of "
                f"{geometry.global_sequences} sequences ({geometry.describe()})"
            )
        self.epoch = 0
        self.step_in_epoch = 0
        self._order = np.zeros(0, dtype=np.int64)
        self._order_epoch = -1

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.sequences), generator=generator).numpy()
            self._order_epoch = epoch
        return self._order

    def next_step(self) -> list[Batch]:
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        geometry = self.geometry
        order = self._permutation(self.epoch)
        base = self.step_in_epoch * geometry.global_sequences
        step_sequences = order[base : base + geometry.global_sequences]  # every rank's, this step
        totals = (
            int(self.sequences.target_counts[step_sequences].sum()),
            int(self.sequences.lengths[step_sequences].sum()),
        )
        micro_batches = []
        for k in range(geometry.grad_accum_steps):
            start = base + (k * geometry.world_size + self.rank) * geometry.micro_batch_size
            chosen = [
                self.sequences.sequence(int(j)) for j in order[start : start + geometry.micro_batch_size]
            ]
            micro_batches.append(collate(chosen, self.pad_id))
            micro_batches[-1].step_totals = totals
        self.step_in_epoch += 1
        return micro_batches

    def epoch_statistics(self) -> tuple[float, float]:
        """Over one epoch, all ranks: non-padding tokens / all positions, and target tokens per optimizer step."""
        geometry = self.geometry
        used = self._permutation(self.epoch)[: self.steps_per_epoch * geometry.global_sequences]
        lengths = self.sequences.lengths[used].reshape(
            -1, geometry.micro_batch_size
        )  # one row per micro-batch
        tokens = int(lengths.sum())
        positions = int(lengths.max(axis=1).sum()) * geometry.micro_batch_size
        targets = int(self.sequences.target_counts[used].sum())
        return tokens / positions, targets / self.steps_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]


def eval_batches(
    examples: list[dict], rank: int, world_size: int, micro_batch_size: int, pad_id: int
) -> list[Batch]:
    """This rank's share of a held-out set as micro-batches; every rank gets the same number of them.

    Examples are sorted longest first, so a micro-batch pads little. Global micro-batch k takes the
    next world_size x micro_batch_size examples and rank r the r-th micro_batch_size of them. A rank
    whose share has run out gets a batch with no targets (one padding token, contributing nothing):
    it must still run every forward, because each forward is a round of FSDP all-gathers.
    """
    ordered = sorted(examples, key=lambda e: -len(e["input_ids"]))
    per_step = world_size * micro_batch_size
    batches = []
    for base in range(0, len(ordered), per_step):
        start = base + rank * micro_batch_size
        chosen = ordered[start : start + micro_batch_size]
        batches.append(collate(chosen or [{"input_ids": [pad_id], "labels": [IGNORE_INDEX]}], pad_id))
        if not chosen:
            batches[-1].num_tokens = 0
    return batches
