"""Fully shard the model: one FSDP unit per decoder layer, and the root unit for the rest.

`fully_shard(module)` turns each parameter of `module` (not already in a unit below it) into a
DTensor that holds 1/N of its rows on each rank. In forward, a unit's pre-hook all-gathers its
parameters (in the compute dtype), the module runs, and the post-hook frees the gathered copy
(`reshard_after_forward`); in backward they are gathered again and the gradients are
reduce-scattered, so each rank ends with the gradient of its own rows only.

Units, in forward order: the root (embeddings, final norm, output head), then each decoder layer.
The root's forward is the whole model's, so it is gathered through every forward anyway; with
`split_root` (torchtitan's layout) it is not freed at the end of forward only to be gathered again
for the loss's backward, and an untied model gets two units of its own: the embeddings (gathered
for their forward and their backward) and the final norm with the output head (gathered once, kept
to their backward). Tied embeddings are one parameter, which can only live in one unit: they stay
in the root, so the split costs nothing there beyond not freeing what is needed next.
Mixed precision: parameters are stored fp32 (the master copy AdamW updates), gathered in bf16
for compute, and gradients reduce-scattered in fp32 (fsdp/precision.py has every mode's dtypes).
Prefetch: FSDP2 issues the next unit's all-gather when the CPU reaches it (on a GPU, ahead of the
kernels; in backward, one unit ahead); `explicit_prefetch=N` issues the next N units' all-gathers
as soon as a unit starts, for when the CPU cannot run ahead (a host sync, a CPU-bound step, gloo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

from fsdp.precision import PRECISIONS, get_precision

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")  # as HF decoders call it


@dataclass(frozen=True)
class ShardSettings:
    precision: str = "mixed"
    reduce_dtype: str | None = None  # None: the precision's own
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    split_root: bool = False
    explicit_prefetch: int = 0  # units ahead; 0: FSDP2's implicit prefetch


def shard_model(
    model: nn.Module, layer_names: list[str], mesh: DeviceMesh, s: ShardSettings | None = None
) -> list[FSDPModule]:
    """fully_shard each decoder layer (by qualified name), the root's parts if split, then the root."""
    s = s or ShardSettings()
    options = {
        "mesh": mesh,
        "mp_policy": get_precision(s.precision, s.reduce_dtype).mixed_precision_policy(),
        "reshard_after_forward": s.reshard_after_forward,
    }
    if s.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    layers = [fully_shard(model.get_submodule(name), **options) for name in layer_names]
    embeddings, head = root_parts(model) if s.split_root else (None, None)
    if embeddings is not None:
        fully_shard(embeddings, **options)
    if head is not None:
        fully_shard(head, **{**options, "reshard_after_forward": False})
    fully_shard(model, **{**options, "reshard_after_forward": s.reshard_after_forward and not s.split_root})
    if s.explicit_prefetch:
        in_order = [u for u in (embeddings, *layers, *(head or [None])[:1]) if u is not None]
        set_explicit_prefetch(in_order, s.explicit_prefetch)
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


def root_parts(model: nn.Module) -> tuple[nn.Module | None, list[nn.Module] | None]:
    """The embeddings and [final norm, output head] of a TrainableCausalLM, as units of their own;
    (None, None) when the embeddings are tied to the head (one parameter, one unit: the root's).

    The head is never called as a module (fsdp/loss.py uses its weight), so it is grouped with the
    final norm, whose forward gathers both; a decoder without a final norm we know keeps the head in
    the root.
    """
    causal_lm = model.causal_lm
    embeddings, output = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    if embeddings.weight is output.weight:
        return None, None
    decoder = causal_lm.get_decoder()
    norm = next(
        (getattr(decoder, n) for n in FINAL_NORM_NAMES if isinstance(getattr(decoder, n, None), nn.Module)),
        None,
    )
    return embeddings, ([norm, output] if norm is not None else None)


def set_explicit_prefetch(units: list[FSDPModule], ahead: int) -> None:
    """Each unit, as its forward starts, issues the all-gathers of the next `ahead` units; in backward,
    of the `ahead` units before it (backward runs the units in reverse)."""
    for i, unit in enumerate(units):
        unit.set_modules_to_forward_prefetch(units[i + 1 : i + 1 + ahead])
        unit.set_modules_to_backward_prefetch(units[max(0, i - ahead) : i][::-1])


def fsdp_units(model: nn.Module) -> list[FSDPModule]:
    """Every module `fully_shard` made an FSDPModule (a grouped unit contributes each of its modules)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unit_groups(model: nn.Module) -> list[tuple[str, list[FSDPModule]]]:
    """Each unit once, in module (forward) order: its name ("root", a layer's qualified name, or the
    grouped modules' names joined by "+") and its modules."""
    groups: dict[int, tuple[list[str], list[FSDPModule]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            names, modules = groups.setdefault(id(module._get_fsdp_state()), ([], []))
            names.append(name or "root")
            modules.append(module)
    return [("+".join(names), modules) for names, modules in groups.values()]


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
