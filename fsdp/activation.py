"""Activation checkpointing: keep a layer's input, drop what its forward made, recompute it in backward.

Policies: `none`, `full` (every decoder layer), `every_k` (layers 0, k, 2k, ...: a knob between
memory and recompute). The wrapper goes *inside* the FSDP unit (we wrap before `fully_shard`), so
FSDP gathers a layer's parameters once for the backward and the recomputation uses them.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_PREFIX,
    CheckpointImpl,
    checkpoint_wrapper,
)

MODES = ("none", "every_k", "full")  # least recomputation (and most memory) first


def checkpointed_layers(num_layers: int, mode: str, every_k: int = 1) -> list[int]:
    """Indices of the decoder layers to checkpoint."""
    if mode == "none":
        return []
    if mode == "full":
        return list(range(num_layers))
    if mode == "every_k":
        return list(range(0, num_layers, every_k))
    raise ValueError(f"activation_checkpointing.mode={mode}: must be one of {', '.join(MODES)}")


def apply_activation_checkpointing(
    root: nn.Module, layer_names: list[str], mode: str, every_k: int = 1
) -> int:
    """Replace the chosen decoder layers of `root` (by qualified name) with checkpointed wrappers."""
    chosen = checkpointed_layers(len(layer_names), mode, every_k)
    for i in chosen:
        parent_name, _, child = layer_names[i].rpartition(".")
        parent = root.get_submodule(parent_name)
        wrapped = checkpoint_wrapper(getattr(parent, child), checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        parent.register_module(child, wrapped)
    return len(chosen)


def clean_name(name: str) -> str:
    """A parameter's name as the Hugging Face checkpoint spells it (no wrapper prefix)."""
    return name.replace(_CHECKPOINT_PREFIX, "")
