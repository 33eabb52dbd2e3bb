"""Every byte the ranks exchange in a step: counted per collective kind and per FSDP unit, beside the theory.

How the counting works. FSDP2 lets each unit take its own all-gather and reduce-scatter
(`set_custom_all_gather`, `set_custom_reduce_scatter`): every unit gets a counting wrapper around
the default ones, so each collective is booked to the unit that issued it, prefetched or not.
While tracking, `dist.all_reduce` and the functional `all_reduce` are wrapped too. HSDP's
all-reduce is FSDP's own: a unit's post-backward (foreach_reduce) calls `dist.all_reduce` on the
reduce-scatter output, over the replicate group, with no hook to swap it (`set_all_reduce_hook`
adds a step after it, it does not replace it); each unit's post-backward is wrapped, so an
all-reduce inside it is booked to that unit. Every other all-reduce is the step's (its loss, its
token counts when the loader does not bring them, and the gradient norm, which DTensor
all-reduces through a functional collective), booked to "step".

What a byte count means. The payload of a collective is its full size: for an all-gather the
output (the unit's unsharded parameters in the compute dtype), for a reduce-scatter the input (its
unsharded gradients in the reduce dtype), for an all-reduce the tensor. With the bandwidth-optimal
ring algorithms (NCCL's and gloo's), each rank sends, and receives, (N-1)/N of an all-gather's or
reduce-scatter's payload and 2 (N-1)/N of an all-reduce's, N the ranks of the collective's group:
`sent_bytes`.

The theory (`expected`), for one optimizer step of A micro-batches over N ranks, with P_u the
padded parameter count of unit u, c the compute dtype's bytes and r the reduce dtype's:
  all-gather      forward: every unit, once per micro-batch:                 A x sum_u P_u x c
                  backward: every unit freed after its forward (reshard_after_forward), again,
                  once per micro-batch; none with fsdp.reshard_after_forward=false
  reduce-scatter  every unit, once per step (or once per micro-batch with
                  fsdp.reduce_grads_every_microbatch=true):                   sum_u P_u x r
Accumulating without a reduction still gathers every micro-batch: FSDP frees the parameters after
each backward, so A micro-batches cost A times the all-gathers and one reduce-scatter.
So with full sharding a step moves about 3 x the model's compute-dtype bytes per micro-batch of
all-gathers and reduce-scatters ("3 x": gather for forward, again for backward, reduce-scatter);
in mixed precision the reduce-scatter is fp32, twice the bf16 bytes.

HSDP, R replicas of S shards (N = R x S; fsdp.replicate): the all-gathers and reduce-scatters
above run within a shard group, so P_u is padded to S and each rank sends (S-1)/S of their
payload; then every reduction all-reduces each rank's reduce-scatter output across the replicas:
  all-reduce      every unit, once per reduction:                            sum_u P_u / S x r
                  each rank sends 2 (R-1)/R of it
Against 1-D at the same N: the model state per rank grows R-fold (1/S of it, not 1/N), the
all-gather and reduce-scatter payloads stay (padding aside), and what crosses between replicas is
one gradient shard per rank and reduction; on R nodes of S GPUs the all-gathers and
reduce-scatters stay on the fast links inside a node.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

from fsdp.precision import get_precision
from fsdp.shard import unit_groups

KINDS = ("all-gather", "reduce-scatter", "all-reduce")
STEP = "step"  # the unit the step's own all-reduces are booked to (loss, token counts, gradient norm)


def ring_factor(kind: str, group_size: int) -> float:
    """Share of the payload each rank sends (and receives) with ring algorithms, in a group of that size."""
    share = (group_size - 1) / group_size
    return 2 * share if kind == "all-reduce" else share


def group_size(group: object = None) -> int:
    """Ranks in a collective's group, however torch.distributed or its functional collectives name
    it (None: the world; a process group, a device mesh, a (mesh, dim) pair, a list of ranks)."""
    if group is None:
        return dist.get_world_size()
    if isinstance(group, dist.ProcessGroup):
        return group.size()
    return dist.distributed_c10d._resolve_process_group(funcol._resolve_group_name(group)).size()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@dataclass
class Event:
    kind: str  # all-gather | reduce-scatter | all-reduce | compute (a unit's forward starts)
    unit: str
    phase: str  # forward | backward | step (the step's all-reduces, around the micro-batches)
    payload_bytes: int = 0


@dataclass
class CommLedger:
    """Payload bytes, bytes sent and calls per (kind, unit), the events in order, and the time spent
    inside calls."""

    world_size: int
    payload: dict = field(default_factory=lambda: defaultdict(int))  # (kind, unit) -> bytes
    sent: dict = field(default_factory=lambda: defaultdict(float))  # (kind, unit) -> bytes each rank sends
    calls: dict = field(default_factory=lambda: defaultdict(int))  # (kind, unit) -> count
    events: list[Event] = field(default_factory=list)
    seconds: float = 0.0  # inside collective calls (CPU: the wait; CUDA: only the launch)

    def book(self, kind: str, unit: str, nbytes: int, seconds: float, group: int | None = None) -> None:
        """One call of `kind` by `unit`, over a group of `group` ranks (None: the world)."""
        self.payload[(kind, unit)] += nbytes
        self.sent[(kind, unit)] += nbytes * ring_factor(kind, group or self.world_size)
        self.calls[(kind, unit)] += 1
        self.seconds += seconds
        phase = STEP if unit == STEP else "backward" if _in_backward() or kind == "all-reduce" else "forward"
        self.events.append(Event(kind, unit, phase, nbytes))

    def totals(self, units: bool | None = None) -> dict[str, dict[str, float]]:
        """Per kind: calls, payload bytes, bytes each rank sends (ring). `units`: True, the FSDP
        units' collectives only (what the theory counts); False, the step's own; None, all."""

        def counted(unit: str) -> bool:
            return units is None or (unit != STEP) == units

        out = {}
        for kind in KINDS:
            keys = [key for key in self.payload if key[0] == kind and counted(key[1])]
            out[kind] = {
                "calls": sum(self.calls[key] for key in keys),
                "payload_bytes": sum(self.payload[key] for key in keys),
                "sent_bytes": sum(self.sent[key] for key in keys),
            }
        return out


class _CountingAllGather(DefaultAllGather):
    def __init__(self, ledger: CommLedger, unit: str):
        self.ledger, self.unit = ledger, unit

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        start = time.perf_counter()
        work = super().__call__(output_tensor, input_tensor, group, async_op)
        nbytes = output_tensor.numel() * output_tensor.element_size()
        self.ledger.book("all-gather", self.unit, nbytes, time.perf_counter() - start, group.size())
        return work


class _CountingReduceScatter(DefaultReduceScatter):
    def __init__(self, ledger: CommLedger, unit: str):
        self.ledger, self.unit = ledger, unit

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        start = time.perf_counter()
        work = super().__call__(output_tensor, input_tensor, group, op, async_op)
        nbytes = input_tensor.numel() * input_tensor.element_size()
        self.ledger.book("reduce-scatter", self.unit, nbytes, time.perf_counter() - start, group.size())
        return work


def unit_names(model: torch.nn.Module) -> dict[FSDPModule, str]:
    """Each FSDP unit (its first module) and its name: fsdp/shard.py's unit_groups."""
    return {modules[0]: name for name, modules in unit_groups(model)}


class CommTracker:
    """`with CommTracker(model, world_size) as t:` counts every collective of the steps inside.

    Also records when each unit's forward and backward compute starts (module hooks), so the event
    list shows the order of collectives around compute, prefetches included.
    """

    def __init__(self, model: torch.nn.Module, world_size: int):
        self.model = model
        self.ledger = CommLedger(world_size)
        self.units = unit_names(model)
        self._saved: list = []
        self._handles: list = []
        self._all_reduces = [(dist, dist.all_reduce), (funcol, funcol.all_reduce)]
        self._reducing: str | None = None  # the unit whose post-backward (reduction) runs now

    def __enter__(self) -> CommTracker:
        for unit, name in self.units.items():
            group = unit._get_fsdp_state()._fsdp_param_group
            if group is None:
                continue
            # The memory ledger may have wrapped post_backward already: what is there is restored.
            post_backward = group.__dict__.get("post_backward")
            self._saved.append((group, group._all_gather_comm, group._reduce_scatter_comm, post_backward))
            group._all_gather_comm = _CountingAllGather(self.ledger, name)
            group._reduce_scatter_comm = _CountingReduceScatter(self.ledger, name)
            group.post_backward = self._reducing_for(name, group.post_backward)
            self._handles.append(unit.register_forward_pre_hook(lambda *_, n=name: self._compute_starts(n)))
        for module, original in self._all_reduces:
            module.all_reduce = self._counting_all_reduce(original)
        return self

    def _reducing_for(self, unit: str, post_backward):
        """The unit's post-backward (its reduce-scatter, and HSDP's all-reduce), booking to `unit`."""

        def run(*args, **kwargs):
            self._reducing = unit
            try:
                return post_backward(*args, **kwargs)
            finally:
                self._reducing = None

        return run

    def _counting_all_reduce(self, original):
        """dist.all_reduce(tensor, op, group, ...) or funcol.all_reduce(tensor, op, group, ...)."""

        def all_reduce(tensor, *args, **kwargs):
            start = time.perf_counter()
            out = original(tensor, *args, **kwargs)
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            nbytes = tensor.numel() * tensor.element_size()
            unit = self._reducing or STEP
            self.ledger.book("all-reduce", unit, nbytes, time.perf_counter() - start, group_size(group))
            return out

        return all_reduce

    def _compute_starts(self, unit: str) -> None:
        # In backward this is a checkpointed layer's forward, run again.
        self.ledger.events.append(Event("compute", unit, "backward" if _in_backward() else "forward"))

    def __exit__(self, *exc) -> None:
        for module, original in self._all_reduces:
            module.all_reduce = original
        for group, all_gather, reduce_scatter, post_backward in self._saved:
            group._all_gather_comm, group._reduce_scatter_comm = all_gather, reduce_scatter
            if post_backward is None:
                del group.post_backward  # the class's own again
            else:
                group.post_backward = post_backward
        for handle in self._handles:
            handle.remove()


def expected(
    units: dict[str, tuple[int, bool]],
    world_size: int,
    micro_batches: int,
    *,
    compute_bytes: int,
    reduce_bytes: int,
    reduce_every_microbatch: bool = False,
    replicate: int = 1,
) -> dict[str, dict[str, float]]:
    """The theory of the module docstring: payload bytes per kind of the FSDP units' collectives,
    for one optimizer step (the step's own all-reduces are not in it).

    `units`: name -> (padded parameter count, whether the unit is freed after its forward), as
    fsdp/layout.py's `describe_units` reports them over the shard group. A unit freed after forward
    is gathered again for its backward, once per micro-batch. With `replicate` R > 1 (HSDP), the
    shard group is world_size / R ranks and each reduction all-reduces the reduce-scatter output
    across the R replicas; there is no "all-reduce" entry without.
    """
    shards = world_size // replicate
    everything = sum(numel for numel, _ in units.values())
    regathered = sum(numel for numel, reshards in units.values() if reshards)
    reductions = micro_batches if reduce_every_microbatch else 1
    # Alone in its shard group a rank gathers and scatters nothing: FSDP skips both.
    gathers = micro_batches * (everything + regathered) * compute_bytes if shards > 1 else 0
    scatters = reductions * everything * reduce_bytes if shards > 1 else 0
    out = {}
    for kind, payload in (("all-gather", gathers), ("reduce-scatter", scatters)):
        out[kind] = {"payload_bytes": payload, "sent_bytes": payload * ring_factor(kind, shards)}
    if replicate > 1:
        payload = reductions * everything // shards * reduce_bytes
        out["all-reduce"] = {
            "payload_bytes": payload,
            "sent_bytes": payload * ring_factor("all-reduce", replicate),
        }
    return out


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.2f} MiB" if nbytes >= 2**14 else f"{nbytes:,.0f} B"


def _rows(ledger: CommLedger) -> list[tuple[str, str, dict]]:
    """(row name, kind, totals) per kind; the all-reduces in two rows when FSDP issued some (HSDP):
    its own, which the theory counts, and the step's."""
    fsdp, step = ledger.totals(units=True), ledger.totals(units=False)
    if not fsdp["all-reduce"]["calls"]:
        return [(kind, kind, t) for kind, t in ledger.totals().items()]
    rows = [(kind, kind, fsdp[kind]) for kind in KINDS]
    return [*rows, ("step all-reduce", "step", step["all-reduce"])]


def format_totals(ledger: CommLedger, theory: dict) -> str:
    """Per collective kind: calls, payload and bytes each rank sends, measured beside the theory."""
    lines = [
        f"{'collective':<15} {'calls':>6} {'payload':>14} {'sent per rank':>14} {'theory (payload)':>17}"
    ]
    for row, kind, t in _rows(ledger):
        expected_payload = theory.get(kind, {}).get("payload_bytes")
        check = ""
        if expected_payload is not None:
            check = _mib(expected_payload) + (
                "  exact" if expected_payload == t["payload_bytes"] else "  differs"
            )
        lines.append(
            f"{row:<15} {t['calls']:>6} {_mib(t['payload_bytes']):>14} {_mib(t['sent_bytes']):>14} {check:>17}"
        )
    return "\n".join(lines)


def format_order(ledger: CommLedger, unit_order: list[str], keep: int = 2) -> str:
    """The step's collectives and compute starts in the order they happened, one line each.

    With many decoder layers only the root, the first and the last `keep` layers are shown; the
    layers between do the same and are folded into one line per phase.
    """
    layers = [u for u in unit_order if u != "root"]
    shown = set(layers[:keep] + layers[-keep:]) | {"root", "step"}
    lines, folded = [], None
    for e in ledger.events:
        if e.unit not in shown:
            if folded is None:
                folded = e.phase
                lines.append(f"  {e.phase:<8} ... the same for {layers[keep]} to {layers[-keep - 1]}")
            continue
        folded = None
        size = f" {_mib(e.payload_bytes)}" if e.kind != "compute" else ""
        what = (
            e.kind
            if e.kind != "compute"
            else ("forward of" if e.phase == "forward" else "recomputed forward of")
        )
        lines.append(f"  {e.phase:<8} {what} {e.unit}{size}")
    return "\n".join(lines)


def step_scalars(ledger: CommLedger) -> dict[str, float]:
    """TensorBoard names: comm/<kind> bytes (payload), comm/<kind> calls, time/comm_s."""
    out = {}
    for kind, t in ledger.totals().items():
        out[f"comm/{kind} bytes"] = t["payload_bytes"]
        out[f"comm/{kind} calls"] = t["calls"]
    out["time/comm_s"] = ledger.seconds
    return out


def step_line(step: int, ledger: CommLedger, theory: dict) -> str:
    """One line a step: each kind's payload and calls beside the theory, and the time inside collectives."""
    parts = []
    for row, kind, t in _rows(ledger):
        expected_payload = theory.get(kind, {}).get("payload_bytes")
        check = "" if expected_payload is None else f", theory {expected_payload / 2**20:,.2f}"
        parts.append(f"{row} {t['payload_bytes'] / 2**20:,.2f} MiB in {t['calls']} calls{check}")
    return (
        f"comm step {step}: " + "; ".join(parts) + f"; {ledger.seconds:.2f} s inside collectives (this rank)"
    )


def theory_for(
    units: list,
    world_size: int,
    micro_batches: int,
    *,
    precision: str,
    reduce_every_microbatch: bool,
    reduce_dtype: str | None = None,
    replicate: int = 1,
) -> dict[str, dict[str, float]]:
    """`expected` for a step, from the shard layout (fsdp/layout.py's describe_units, over the
    shard group: Dist.shard_size ranks), the precision and HSDP's replicas (Dist.replicas)."""
    p = get_precision(precision, reduce_dtype)
    return expected(
        {u.name: (u.padded_numel, u.reshard_after_forward) for u in units},
        world_size,
        micro_batches,
        compute_bytes=p.compute_bytes,
        reduce_bytes=p.reduce_bytes,
        reduce_every_microbatch=reduce_every_microbatch,
        replicate=replicate,
    )
