"""Measuring without the hardware: a fake process group and fake tensors, so a laptop is rank 0 of N GPUs.

Under both, the real model build, sharding and training step run: every tensor has a shape, a
dtype and a device but no memory and no values, the collectives return at once, and the ledger
(fsdp/memory/ledger.py) records what rank 0 would allocate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed.tensor import _sharding_prop

from fsdp.dist import Dist, make_mesh


def host_float(t: torch.Tensor, placeholder: float = math.nan) -> float:
    """float(t); under FakeTensorMode (a memory estimate) tensors have shapes but no values: `placeholder`."""
    return placeholder if isinstance(t, FakeTensor) else float(t)


@contextmanager
def fake_process_group(world_size: int, replicate: int = 1) -> Iterator[Dist]:
    """Be rank 0 of `world_size` ranks that do not exist: collectives return at once, moving nothing.

    With `replicate` > 1 the mesh is HSDP's (fsdp/dist.py make_mesh): `replicate` replicas, rank 0
    in the first, of world_size / replicate shards each (a node's ranks, so its local world).

    The device mesh is made here, outside FakeTensorMode (inside, its bookkeeping tensors would
    be fake too); the model, optimizer and batches are then made inside the fake mode, so every
    tensor has a shape, a dtype and a device but no memory, and a step of an 8B model runs on a
    laptop while the ledger records what rank 0 would allocate.
    """
    # Importing it registers the "fake" backend with torch.distributed: only when one is wanted.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = make_mesh("cpu", world_size, replicate)
        yield Dist(0, world_size, 0, world_size // replicate, torch.device("cpu"), "fake", mesh)
    finally:
        dist.destroy_process_group()


@contextmanager
def fake_tensors() -> Iterator[None]:
    """FakeTensorMode, with DTensor's shape propagation kept out of the ledger.

    DTensor works out each op's output shape by running the op on global-shape fake tensors, in
    the fake mode already active if there is one. Under our fake mode the tracker cannot tell
    those from the step's own tensors (it skips only ops of *another* fake mode) and would count
    a full-size copy of every gradient. Giving the propagation a fake mode of its own keeps them out.
    And transformers, seeing fake tensors, treats the step as traced: it cannot read positions
    to rule out packed sequences, so it builds a (seq x seq) causal mask and attention leaves its
    fused kernel. A real step of full unpacked sequences has no mask; we tell transformers so.
    """
    from transformers import masking_utils  # heavy: only when a fake step runs

    with (
        FakeTensorMode(),
        mock.patch.object(_sharding_prop, "detect_fake_mode", lambda *args: None),
        mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda *args, **kwargs: None),
        mock.patch.object(masking_utils, "_ignore_causal_mask_sdpa", lambda *args, **kwargs: True),
    ):
        yield
