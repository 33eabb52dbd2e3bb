"""Activation checkpointing: keep a layer's input, drop what its forward made, recompute it in backward.

Policies: `none`, `full` (every decoder layer), `every_k` (layers 0, k, 2k, ...: a knob between
memory and recompute), `selective` (every decoder layer, op by op, as torchtitan's, torchtune's and
Megatron's selective checkpointing: the outputs of the matmuls and of attention are kept, only the
cheap ops between them, norms, rotary, SiLU, products and sums, are recomputed; no matmul runs twice).
The wrapper goes *inside* the FSDP unit (we wrap before `fully_shard`), so FSDP gathers a layer's
parameters once for the backward and the recomputation uses them.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_PREFIX,
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# Least recomputation first (plan.py and report.py read them in this order, "cheapest first"):
# selective recomputes no matmul, every_k every k-th layer's, full every layer's.
MODES = ("none", "selective", "every_k", "full")

_aten = torch.ops.aten
# What `selective` keeps: the outputs of the ops that hold the FLOPs. nn.Linear reaches the
# dispatcher as mm (addmm with a bias, bmm batched); attention as whichever fused kernel SDPA
# picks: flash_attention_for_cpu on a CPU, flash, efficient or cudnn on CUDA, the overrideable
# one on other backends. Each keeps its output and its fp32 softmax statistics.
SAVED_OPS = frozenset(
    {
        _aten.mm,
        _aten.addmm,
        _aten.bmm,
        _aten._scaled_dot_product_flash_attention_for_cpu,
        _aten._scaled_dot_product_flash_attention,
        _aten._scaled_dot_product_efficient_attention,
        _aten._scaled_dot_product_cudnn_attention,
        _aten._scaled_dot_product_fused_attention_overrideable,
    }
)


def selective_policy(ctx: object, func: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    """Keep a matmul's or attention's output from the forward; recompute everything else."""
    # An OpOverload (aten.mm.default) is matched by its packet (aten.mm): every overload of the op.
    saved = getattr(func, "overloadpacket", func) in SAVED_OPS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_layers(num_layers: int, mode: str, every_k: int = 1) -> list[int]:
    """Indices of the decoder layers to checkpoint."""
    if mode == "none":
        return []
    if mode in ("full", "selective"):
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
        # Selective: the checkpoint's context decides, op by op, what is kept and what recomputed.
        context = (
            {"context_fn": functools.partial(create_selective_checkpoint_contexts, selective_policy)}
            if mode == "selective"
            else {}
        )
        wrapped = checkpoint_wrapper(
            getattr(parent, child), checkpoint_impl=CheckpointImpl.NO_REENTRANT, **context
        )
        parent.register_module(child, wrapped)
    return len(chosen)


def recomputed_layers(num_layers: int, mode: str, every_k: int = 1) -> list[int]:
    """Indices of the decoder layers whose forward matmuls run again in backward (fsdp/flops.py's
    hardware FLOPs): the checkpointed ones, but none under `selective`, whose recomputation is
    elementwise only."""
    return [] if mode == "selective" else checkpointed_layers(num_layers, mode, every_k)


def clean_name(name: str) -> str:
    """A parameter's name as the Hugging Face checkpoint spells it (no wrapper prefix)."""
    return name.replace(_CHECKPOINT_PREFIX, "")
