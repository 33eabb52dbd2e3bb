"""The reports: the analytic model beside the measured ledgers, as tables in GiB, and `make estimate`'s text.

An offloaded run (fsdp.cpu_offload) has two columns per source, "host" and "device"; an HSDP run's
estimate shows the same run on a 1-D mesh beside it.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fsdp.activation import MODES
from fsdp.memory.analytic import ModelShape, Workload, predict
from fsdp.memory.plan import HEADROOM, LEVERS, Answer, Plan, fits, quick_math_table
from fsdp.memory.vocabulary import CATEGORIES, PHASES, PLACES


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_table(columns: dict[str, dict[str, float]], rows: tuple[str, ...] = CATEGORIES) -> str:
    """Categories down, sources across (analytic, measured, fake...), in GiB; empty rows dropped."""
    names = list(columns)
    width = max(14, *(len(n) + 2 for n in names))
    lines = [f"    {'':<24}" + "".join(f"{n:>{width}}" for n in names)]
    for row in rows:
        values = [columns[n].get(row) for n in names]
        if all(not v for v in values):
            continue
        cells = "".join(f"{'-' if v is None else f'{v / 2**30:.3f}':>{width}}" for v in values)
        lines.append(f"    {row:<24}" + cells)
    return "\n".join(lines)


def phase_rows(source: dict) -> dict[str, int]:
    """A prediction's or a ledger's phase peaks, as table rows."""
    phases = source["phases"]
    rows = {f"peak: {p}": v if isinstance(v, int | float) else v["total"] for p, v in phases.items()}
    rows["peak"] = source["peak"]
    for key in ("host peak RSS", "cuda max allocated", "cuda max reserved"):
        if key in source:
            rows[key] = source[key]
    return rows


PHASE_ROWS = (
    *(f"peak: {p}" for p in PHASES),
    "peak",
    "host peak RSS",
    "cuda max allocated",
    "cuda max reserved",
)
# The whole-process measurements a StepMemory adds, by the place they measure.
_MEASURED_IN = {"host": ("host peak RSS",), "device": ("cuda max allocated", "cuda max reserved")}


def has_places(source: dict) -> bool:
    """Whether a prediction or a ledger keeps host and device apart: an offloaded run's."""
    return source.get("host", {}).get("peak", 0) > 0


def columns(name: str, source: dict) -> dict[str, dict[str, float]]:
    """A prediction's or a ledger's table column (categories, then phase peaks); for an offloaded
    run two, "<name> host" and "<name> device", each place's own categories and peaks."""
    if not has_places(source):
        return {name: {**source["categories"], **phase_rows(source)}}
    out = {}
    for where in PLACES:
        measured = {k: source[k] for k in _MEASURED_IN[where] if k in source}
        out[f"{name} {where}".strip()] = {
            **source[where]["categories"],
            **phase_rows(source[where]),
            **measured,
        }
    return out


def host_holds(predicted: dict) -> str:
    """What an offloaded run keeps in host memory, in words: fsdp.cpu_offload's, the activations'."""
    host = predicted["host"]["categories"]
    held = ["offloaded model state and AdamW"] if host["optimizer state"] else []
    return " and ".join([*held, *(["offloaded activations"] if host["activations"] else [])])


def report(predicted: dict, ledgers: dict[str, dict], title: str) -> str:
    """The analytic model beside each tracked step's ledger: categories (each its own peak), then phases."""
    table = columns("analytic", predicted)
    for name, ledger in ledgers.items():
        table.update(columns(name, ledger))
    places = f" (host: {host_holds(predicted)}; device: the rest)" if has_places(predicted) else ""
    return "\n".join(
        [
            f"{title}: each category's own peak over the step; then each phase's peak, all categories"
            + places,
            format_table(table),
            format_table(table, PHASE_ROWS).split("\n", 1)[1],
        ]
    )


def peak_line(fake: dict, count: int = 3) -> str:
    """Which phase sets the peak, and why: the categories alive together at that moment of the fake
    step, largest first (each category's own peak, above, may come at another moment)."""
    phase = fake["peak_phase"]
    alive = {k: v for k, v in fake["phases"][phase].items() if k != "total" and v > 0}
    largest = sorted(alive.items(), key=lambda kv: -kv[1])[:count]
    rest = fake["phases"][phase]["total"] - sum(v for _, v in largest)
    return (
        f"the peak comes in the {phase} (fake step): "
        + ", ".join(f"{name} {gib(v)}" for name, v in largest)
        + f" alive together, and {gib(rest)} more"
    )


def estimate_report(
    model_name: str,
    shape: ModelShape,
    steps: list[tuple[Workload, dict, dict]],
    seconds: float,
    plans: str | None = None,
) -> str:
    """What `make estimate` prints: the usual quick math, then this run's bytes per rank and what
    each checkpointing mode would change; or, planning (`plans`: plan_report's text), what fits,
    then the bytes per rank of the recommended plan.

    `steps`: (workload, prediction, fake-measured ledger) of the run, last, and of the meshes shown
    beside it (an HSDP run's 1-D twin, first); `seconds` the fake steps took together.
    """
    w, predicted, _ = steps[-1]
    n, shards = w.world_size, w.shard_size
    lines = [
        f"memory estimate: {model_name}, {shape.num_params:,} params, {n} ranks, precision {w.precision}, "
        f"activation checkpointing {w.checkpointing}, micro-batch {w.micro_batch_size} x {w.seq_len} tokens, "
        f"{w.grad_accum_steps} micro-batches per step"
        + (
            " (reduced once per step)"
            if w.grad_accum_steps > 1 and not w.reduce_grads_every_microbatch
            else ""
        ),
        "",
        f"the usual quick math (16-bit weights and gradients, AdamW states), and this code's model state "
        f"(GB = 1e9 bytes), sharded over {shards} ranks"
        + (f" (each of {w.replicate} replicas)" if w.replicate > 1 else "")
        + ":",
        f"    {'':<44}{'whole model':>14}{'per rank':>14}",
    ]
    for row, whole, per_rank in quick_math_table(shape.num_params, shards, w.precision, w.state_dtype):
        per = "" if math.isnan(per_rank) else f"{per_rank:.1f}"
        lines.append(f"    {row:<44}{whole:>14.1f}{per:>14}")
    # One view: analytic beside fake-measured; several: each mesh's pair, its label first.
    table: dict[str, dict[str, float]] = {}
    for view, view_predicted, fake in steps:
        label = view.mesh_label if len(steps) > 1 else ""
        analytic = "" if has_places(view_predicted) else "analytic"  # else: "host", "device"
        table.update(columns(f"{label} {analytic}".strip(), view_predicted))
        table.update(columns(f"{label} fake" if label or has_places(fake) else "fake-measured", fake))
    legend = [f"    {view.describe_mesh()}" for view, _, _ in steps] if len(steps) > 1 else []
    if has_places(predicted):
        levers = [("fsdp.cpu_offload", "the model state and AdamW's step")] if w.cpu_offload else []
        levers += (
            [("activation_checkpointing.offload", "what the layers save")] if w.activation_offload else []
        )
        legend.append(
            "    host, device: analytic, with "
            + " and ".join(f"{key} (host: {what})" for key, what in levers)
            + "; fake: measured on one CPU, "
            + " and ".join(
                ["the model state booked where CPUOffloadPolicy keeps it"] * w.cpu_offload
                + ["the activations' host copies booked apart"] * w.activation_offload
            )
        )
    device_peak = "device peak" if has_places(predicted) else "peak"
    if plans:
        lines += ["", plans]
    lines += [
        "",
        ("plan 1: " if plans else "")
        + f"bytes per rank (GiB), rank 0 of {n}: each category's own peak; then each phase's peak "
        f"(fake-tensor step{'s' if len(steps) > 1 else ''} measured in {seconds:.0f} s)",
        *legend,
        format_table(table),
        format_table(table, PHASE_ROWS).split("\n", 1)[1],
        peak_line(steps[-1][2]),
    ]
    if len(steps) > 1:
        flat = steps[0][1]
        state = ("sharded params", "sharded grads", "optimizer state")
        more = sum(predicted["categories"][k] - flat["categories"][k] for k in state)
        lines.append(
            f"    {w.mesh_label} against 1-D (analytic): {w.replicate}x the model state per rank (+{gib(more)}), "
            f"device peak {gib(flat['device']['peak'])} -> {gib(predicted['device']['peak'])}; in exchange, only "
            "each rank's gradient shard crosses between replicas, all-reduced (make explain: the bytes)"
        )
    if plans:
        return "\n".join(lines)
    lines += [
        "",
        "activation checkpointing, analytic (GiB per rank):",
        f"    {'mode':<12}{'activations':>14}{'temporaries':>14}{device_peak:>14}"
        + (f"{'host act.':>14}{'copied/step':>14}" if w.activation_offload else ""),
    ]
    for mode in MODES:
        p = predict(shape, replace(w, checkpointing=mode))
        c = p["device"]["categories"]
        lines.append(
            f"    {mode:<12}{c['activations'] / 2**30:>14.2f}{c['temporaries'] / 2**30:>14.2f}"
            f"{p['device']['peak'] / 2**30:>14.2f}"
            # Offloaded: the activations on the host, and the bytes over PCIe a step (out and back).
            + (
                f"{p['host']['categories']['activations'] / 2**30:>14.2f}{p['activation copies'] / 2**30:>14.2f}"
                if w.activation_offload
                else ""
            )
        )
    if w.grad_accum_steps > 1 and not w.reduce_grads_every_microbatch:
        every = predict(shape, replace(w, reduce_grads_every_microbatch=True))
        lines += [
            "",
            f"{w.grad_accum_steps} micro-batches reduced once keep every whole gradient: unsharded grads "
            f"{predicted['categories']['unsharded grads'] / 2**30:.2f} GiB. With fsdp.reduce_grads_every_microbatch=true: "
            f"{every['categories']['unsharded grads'] / 2**30:.2f} GiB, {device_peak} {every['device']['peak'] / 2**30:.2f} GiB "
            f"(analytic), for {w.grad_accum_steps}x the reduce-scatter traffic.",
        ]
    return "\n".join(lines)


def launcher(world_size: int, per_node: int) -> str:
    """torchrun's command line for `world_size` GPUs, `per_node` on each node."""
    if world_size <= per_node:
        return f"torchrun --nproc_per_node={world_size}"
    return (
        f"torchrun --nnodes={world_size // per_node} --nproc_per_node={per_node} "
        "--rdzv_backend=c10d --rdzv_endpoint=HOST:29500"
    )


def command(plan: Plan, base_args: list[str], per_node: int) -> str:
    """The train.py command that runs `plan`: the estimate's own arguments (but memory.*), and the plan's levers."""
    overrides = plan.overrides()
    # Every lever's key is the plan's to set: a lever the plan leaves off is left at its default.
    keys = {o.split("=", 1)[0] for o in overrides} | {key.split("=", 1)[0] for _, _, key in LEVERS}
    keys.add("activation_checkpointing.every_k")
    kept = [a for a in base_args if not a.startswith("memory.") and a.split("=", 1)[0] not in keys]
    return f"{launcher(plan.workload.world_size, per_node)} train.py {' '.join(kept + overrides)}"


def plan_report(answer: Answer, base_args: list[str], per_node: int, shown: int = 5) -> str:
    """The planner's answer: the run as configured, then the cheapest plans that fit, each with its
    peaks, what it costs per step and rank, and (the recommended one) the command that runs it."""
    w, hw = answer.configured.workload, answer.hardware
    budget = answer.budget_bytes / 2**30
    asked = answer.configured.device_peak
    lines = [
        f"what fits in {budget:g} GiB per GPU? (analytic device peak, {HEADROOM:.0%} of the budget kept free: "
        "the model's error bound; leave room for the CUDA context too) "
        f"micro-batch {w.micro_batch_size} x {w.seq_len} tokens, {w.grad_accum_steps} micro-batches per step",
        f"    as configured ({answer.configured.label()}) on {w.world_size} GPU{'s' * (w.world_size > 1)}: "
        f"device peak {gib(asked)}: {'fits' if fits(asked, answer.budget_bytes) else 'does not fit'}",
    ]
    if not answer.plans:
        lines.append(
            "    -> nothing fits on any number of GPUs: a shorter sequence, a smaller micro-batch or bf16 would"
        )
        return "\n".join(lines)
    if answer.world_size != w.world_size:
        lines.append(
            f"    nothing fits on {w.world_size} GPU{'s' * (w.world_size > 1)}; the fewest that fit: "
            f"{answer.world_size} (the same micro-batch and accumulation per GPU)"
        )
        per_node = 8 if answer.world_size > 8 else answer.world_size
    lines += [
        f"    the cheapest plans on {answer.world_size} GPU{'s' * (answer.world_size > 1)}, by extra seconds per step at {hw.describe()}:",
        f"    {'':<3}{'device':>9}{'host':>9}{'recompute':>11}{'host<->dev':>12}{'more comm':>11}{'extra':>8}",
        f"    {'':<3}{'GiB':>9}{'GiB':>9}{'TFLOP':>11}{'GB':>12}{'GB':>11}{'s/step':>8}   plan",
    ]
    for i, p in enumerate(answer.plans[:shown], 1):
        host = p.prediction["host"]["peak"] if has_places(p.prediction) else 0
        lines.append(
            f"    {i:<3}{p.device_peak / 2**30:>9.2f}{host / 2**30:>9.2f}"
            f"{p.recompute_flops / 1e12:>11.1f}{p.host_device_bytes / 1e9:>12.1f}{p.comm_bytes / 1e9:>11.1f}"
            f"{p.seconds(hw):>8.2f}   {p.label()}"
        )
    best = answer.plans[0]
    lines += [
        "    -> plan 1, measured on fake tensors below; to run it:",
        f"       {command(best, base_args, per_node)}",
    ]
    return "\n".join(lines)
