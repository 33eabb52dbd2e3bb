"""Fully shard the model: one FSDP unit per decoder layer, and the root unit for the rest.

`fully_shard(module)` turns each parameter of `module` (not already in a unit below it) into a
DTensor that holds 1/N of its rows on each rank. In forward, a unit's pre-hook all-gathers its
parameters (in the compute dtype), the module runs, and the post-hook frees the gathered copy
(`reshard_after_forward`); in backward they are gathered again and the gradients are
reduce-scattered, so each rank ends with the gradient of its own rows only.

Units, in forward order: the root (embeddings, final norm, output head; tied embeddings must
share one unit, and the root stays gathered through backward anyway), then each decoder layer.
Mixed precision: parameters are stored fp32 (the master copy AdamW updates), gathered in bf16
for compute, and gradients reduce-scattered in fp32.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

PARAM_DTYPE = {"mixed": torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """mixed: fp32 storage, bf16 compute, fp32 reduction. bf16 and fp32: compute in the storage dtype."""
    if precision == "mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(
    model: nn.Module,
    layer_names: list[str],
    mesh: DeviceMesh,
    precision: str = "mixed",
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> list[FSDPModule]:
    """fully_shard each decoder layer (by qualified name), then the root. Returns the units, root first."""
    options = {
        "mesh": mesh,
        "mp_policy": mixed_precision_policy(precision),
        "reshard_after_forward": reshard_after_forward,
    }
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for name in layer_names:
        fully_shard(model.get_submodule(name), **options)
    fully_shard(model, **options)
    units = fsdp_units(model)
    # Each rank's micro-batch loss is already divided by the *global* target-token count, so the
    # gradients must be summed across ranks, not averaged (FSDP's default divides by N). A divide
    # factor of 1 alone would ask for PREMUL_SUM, which gloo lacks; with "force sum" FSDP uses a
    # plain SUM and then divides by the factor, 1. Neither setter recurses, hence every unit.
    # Alone (one rank) FSDP already sums, and a factor would only add a division of every gradient.
    if mesh.size() > 1:
        for unit in units:
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return units


def fsdp_units(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]
