"""The reports: the analytic model beside the measured ledgers, as tables in GiB, and `make estimate`'s text.

An offloaded run (fsdp.cpu_offload) has two columns per source, "host" and "device"; an HSDP run's
estimate shows the same run on a 1-D mesh beside it.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fsdp.activation import MODES
from fsdp.memory.analytic import ModelShape, Workload, predict
from fsdp.memory.plan import fits, quick_math_table
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


def report(predicted: dict, ledgers: dict[str, dict], title: str) -> str:
    """The analytic model beside each tracked step's ledger: categories (each its own peak), then phases."""
    table = columns("analytic", predicted)
    for name, ledger in ledgers.items():
        table.update(columns(name, ledger))
    places = " (host: offloaded model state and AdamW; device: the rest)" if has_places(predicted) else ""
    return "\n".join(
        [
            f"{title}: each category's own peak over the step; then each phase's peak, all categories"
            + places,
            format_table(table),
            format_table(table, PHASE_ROWS).split("\n", 1)[1],
        ]
    )


def estimate_report(
    model_name: str,
    shape: ModelShape,
    steps: list[tuple[Workload, dict, dict]],
    seconds: float,
    fit_gib: float | None,
) -> str:
    """What `make estimate` prints: the usual quick math, then this run's bytes per rank, then what fits.

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
    for row, whole, per_rank in quick_math_table(shape.num_params, shards, w.precision):
        per = "" if math.isnan(per_rank) else f"{per_rank:.1f}"
        lines.append(f"    {row:<44}{whole:>14.1f}{per:>14}")
    # One view: analytic beside fake-measured; several: each mesh's pair, its label first.
    table: dict[str, dict[str, float]] = {}
    for view, view_predicted, fake in steps:
        label = view.mesh_label if len(steps) > 1 else ""
        analytic = "" if has_places(view_predicted) else "analytic"  # else: "host", "device"
        table.update(columns(f"{label} {analytic}".strip(), view_predicted))
        table.update(columns(f"{label} fake" if label else "fake-measured", fake))
    legend = [f"    {view.describe_mesh()}" for view, _, _ in steps] if len(steps) > 1 else []
    if has_places(predicted):
        legend.append(
            "    host, device: analytic, with fsdp.cpu_offload (host: the model state and AdamW's step); "
            "fake: both places, measured on one CPU"
        )
    device_peak = "device peak" if has_places(predicted) else "peak"
    lines += [
        "",
        f"bytes per rank (GiB), rank 0 of {n}: each category's own peak; then each phase's peak "
        f"(fake-tensor step{'s' if len(steps) > 1 else ''} measured in {seconds:.0f} s)",
        *legend,
        format_table(table),
        format_table(table, PHASE_ROWS).split("\n", 1)[1],
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
    lines += [
        "",
        "activation checkpointing, analytic (GiB per rank):",
        f"    {'mode':<12}{'activations':>14}{'temporaries':>14}{device_peak:>14}",
    ]
    for mode in MODES:
        p = predict(shape, replace(w, checkpointing=mode))
        c = p["device"]["categories"]
        lines.append(
            f"    {mode:<12}{c['activations'] / 2**30:>14.2f}{c['temporaries'] / 2**30:>14.2f}"
            f"{p['device']['peak'] / 2**30:>14.2f}"
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
    if fit_gib:
        answer = fits(shape, w, int(fit_gib * 2**30))
        lines += [
            "",
            f"does it fit in {fit_gib:g} GiB per rank? (analytic {device_peak}; leave room for the CUDA context)",
        ]
        for mode, micro in answer.items():
            verdict = f"micro-batch up to {micro}" if micro else "no micro-batch fits"
            lines.append(f"    activation checkpointing {mode:<8} {verdict} (x {w.seq_len} tokens)")
        cheapest = next((m for m, micro in answer.items() if micro >= w.micro_batch_size), None)
        lines.append(
            f"    -> micro-batch {w.micro_batch_size}: cheapest checkpointing that fits: {cheapest}"
            if cheapest
            else f"    -> micro-batch {w.micro_batch_size} does not fit with any checkpointing mode; "
            "more ranks, a shorter sequence or bf16 would"
        )
    return "\n".join(lines)
