"""The shard layout, for reading: every FSDP unit, each parameter's full shape and each rank's rows.

`describe_units` reads it off a sharded model (fsdp/shard.py made it); `format_units` prints it, as
`make explain` shows. The split is torch.chunk's, which FSDP uses: ceil(rows / N) rows per rank,
the last ranks short, and padded to that size whenever the rows are gathered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from fsdp.activation import clean_name
from fsdp.precision import PRECISIONS
from fsdp.shard import unit_groups


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
    module_names = {id(m): n for n, m in model.named_modules()}
    out = []
    for unit_name, modules in unit_groups(model):
        group = modules[0]._get_fsdp_state()._fsdp_param_group
        if group is None:
            continue  # a root whose parts all went to units of their own
        params = []
        for fsdp_param in group.fsdp_params:
            shape = tuple(fsdp_param.sharded_param.shape)
            rows, rest = shape[0], math.prod(shape[1:])
            per_rank = -(-rows // world_size)
            rank_shapes = [
                (max(0, min(rows, (r + 1) * per_rank) - min(rows, r * per_rank)), *shape[1:])
                for r in range(world_size)
            ]
            params.append(
                ParamShards(
                    _qualified(module_names, fsdp_param._module_info),
                    shape,
                    rank_shapes,
                    per_rank * world_size - rows,
                    per_rank * world_size * rest,
                    per_rank * rest * storage,
                    per_rank * world_size * rest * compute,
                )
            )
        out.append(UnitShards(unit_name, params, group.post_forward_mesh_info is not None))
    return out


def _qualified(module_names: dict[int, str], info) -> str:
    """A parameter's qualified name from FSDP's record of it (its module and attribute name): the
    module attribute itself may hold the gathered tensor rather than the shard just now."""
    prefix = module_names[id(info.module)]
    return f"{prefix}.{info.param_name}" if prefix else info.param_name


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
            # Named as the checkpoint spells them: activation checkpointing's wrapper is not the model.
            lines.append(f"    {clean_name(p.name):<48} {list(p.full_shape)!s:>14} -> {shards}{pad}")
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
