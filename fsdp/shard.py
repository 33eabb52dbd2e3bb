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

from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

from fsdp.precision import get_precision

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
        # The grouped head unit is prefetched through its first module, the final norm.
        in_order = [u for u in (embeddings, *layers, head[0] if head else None) if u is not None]
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
