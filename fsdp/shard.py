"""Fully shard the model: one FSDP unit per decoder layer, and the root unit for the rest.

`fully_shard(module)` turns each parameter of `module` (not already in a unit below it) into a
DTensor that holds 1/N of its rows on each rank. In forward, a unit's pre-hook all-gathers its
parameters (in the compute dtype), the module runs, and the post-hook frees the gathered copy
(`reshard_after_forward`); in backward they are gathered again and the gradients are
reduce-scattered, so each rank ends with the gradient of its own rows only.

Units, in forward order: the root (embeddings, final norm, output head; tied embeddings must
share one unit, and the root stays gathered through backward anyway), then each decoder layer.
Mixed precision: parameters are stored fp32 (the master copy AdamW updates), gathered in bf16
for compute, and gradients reduce-scattered in fp32 (fsdp/precision.py has every mode's dtypes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

from fsdp.precision import PRECISIONS


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
        "mp_policy": PRECISIONS[precision].mixed_precision_policy(),
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


@dataclass
class ParamShards:
    """One parameter of a unit: its full shape, each rank's rows, and its bytes per rank."""

    name: str
    full_shape: tuple[int, ...]
    rank_shapes: list[tuple[int, ...]]  # the local shard of each rank (the last ones may be short)
    padding_rows: int  # rows FSDP adds so every rank holds ceil(rows / N) of them
    padded_numel: int  # the whole parameter with that padding: what an all-gather outputs
    storage_bytes: int  # per rank: the padded shard in the storage dtype (what stays allocated)
    gathered_bytes: int  # the whole padded parameter in the compute dtype (alive while gathered)


@dataclass
class UnitShards:
    name: str  # "root" or the decoder layer's qualified name
    params: list[ParamShards]
    reshard_after_forward: bool  # False: stays gathered from its forward to its backward

    @property
    def storage_bytes(self) -> int:
        return sum(p.storage_bytes for p in self.params)

    @property
    def gathered_bytes(self) -> int:
        return sum(p.gathered_bytes for p in self.params)

    @property
    def padded_numel(self) -> int:
        return sum(p.padded_numel for p in self.params)


def describe_units(model: nn.Module, world_size: int, precision: str) -> list[UnitShards]:
    """Every FSDP unit in forward order (root first), each parameter's shards on each of the ranks.

    Shapes come from the sharded model itself (each DTensor's global shape); the split is
    torch.chunk's, which FSDP uses: ceil(rows / N) rows per rank, padded to that on the short ones.
    """
    storage = PRECISIONS[precision].storage_bytes
    compute = PRECISIONS[precision].compute_bytes  # as gathered
    units = fsdp_units(model)
    names = {m: (n or "root") for n, m in model.named_modules() if m in units}
    nested = {n + "." for m, n in names.items() if n != "root"}
    out = []
    for unit in units:
        prefix = "" if names[unit] == "root" else names[unit] + "."
        params = []
        for name, p in unit.named_parameters():
            full_name = prefix + name
            if names[unit] == "root" and any(full_name.startswith(n) for n in nested):
                continue  # a parameter of a decoder layer's own unit
            shape = tuple(p.shape)
            rows, rest = shape[0], math.prod(shape[1:])
            per_rank = -(-rows // world_size)
            rank_shapes = [
                (max(0, min(rows, (r + 1) * per_rank) - min(rows, r * per_rank)), *shape[1:])
                for r in range(world_size)
            ]
            params.append(
                ParamShards(
                    full_name,
                    shape,
                    rank_shapes,
                    per_rank * world_size - rows,
                    per_rank * world_size * rest,
                    per_rank * rest * storage,
                    per_rank * world_size * rest * compute,
                )
            )
        group = unit._get_fsdp_state()._fsdp_param_group
        reshards = group is not None and group.post_forward_mesh_info is not None
        out.append(UnitShards(names[unit], params, reshards))
    return out


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.1f} KiB"


def _relative_layout(unit: UnitShards) -> list:
    return [(p.name.removeprefix(unit.name + "."), p.full_shape) for p in unit.params]


def format_units(units: list[UnitShards], world_size: int, precision: str) -> str:
    """The shard layout as text: each unit, each parameter's full shape -> its shard on each rank.

    A run of decoder-layer units laid out like the first of the run is folded into one line.
    """
    storage, compute = PRECISIONS[precision].storage_label, PRECISIONS[precision].compute_label
    lines = [
        f"FSDP units over {world_size} ranks, in forward order: parameters stored {storage} and sharded, "
        f"gathered whole in {compute} one unit at a time"
    ]
    i = 0
    while i < len(units):
        unit = units[i]
        stays = (
            "freed after its forward, gathered again for its backward"
            if unit.reshard_after_forward
            else "stays gathered from its forward to its backward"
        )
        lines.append(
            f"unit {i}: {unit.name}  ({len(unit.params)} params; per rank {_mb(unit.storage_bytes)} stored, "
            f"{_mb(unit.gathered_bytes)} while gathered; {stays})"
        )
        for p in unit.params:
            if len(set(p.rank_shapes)) == 1:
                shards = f"each rank {list(p.rank_shapes[0])}"
            else:
                shards = ", ".join(f"rank {r} {list(s)}" for r, s in enumerate(p.rank_shapes))
            pad = f" (+{p.padding_rows} padding rows)" if p.padding_rows else ""
            lines.append(f"    {p.name:<48} {list(p.full_shape)!s:>14} -> {shards}{pad}")
        same = i + 1
        while same < len(units) and _relative_layout(units[same]) == _relative_layout(unit) != []:
            same += 1
        if same == i + 2:
            lines.append(f"unit {i + 1}: {units[i + 1].name}, laid out like unit {i}")
        elif same > i + 2:
            lines.append(
                f"units {i + 1}-{same - 1}: {units[i + 1].name} ... {units[same - 1].name}, laid out like unit {i}"
            )
        i = same
    total_storage = sum(u.storage_bytes for u in units)
    largest = sorted((u.gathered_bytes for u in units), reverse=True)
    lines.append(
        f"per rank: {_mb(total_storage)} of parameters stored; gathered copies: the largest unit "
        f"{_mb(largest[0])}, the two largest together {_mb(sum(largest[:2]))} (a unit and the next, prefetched)"
    )
    return "\n".join(lines)
