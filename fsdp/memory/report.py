"""The reports: the analytic model beside the measured ledgers, as tables in GiB, and `make estimate`'s text."""

from __future__ import annotations

import math
from dataclasses import replace

from fsdp.activation import MODES
from fsdp.memory.analytic import ModelShape, Workload, predict
from fsdp.memory.plan import fits, quick_math_table
from fsdp.memory.vocabulary import CATEGORIES, PHASES


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_table(columns: dict[str, dict[str, float]], rows: tuple[str, ...] = CATEGORIES) -> str:
    """Categories down, sources across (analytic, measured, fake...), in GiB; empty rows dropped."""
    names = list(columns)
    lines = [f"    {'':<24}" + "".join(f"{n:>14}" for n in names)]
    for row in rows:
        values = [columns[n].get(row) for n in names]
        if all(not v for v in values):
            continue
        cells = "".join(f"{'-' if v is None else f'{v / 2**30:.3f}':>14}" for v in values)
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


def report(predicted: dict, ledgers: dict[str, dict], title: str) -> str:
    """The analytic model beside each tracked step's ledger: categories (each its own peak), then phases."""
    columns = {"analytic": {**predicted["categories"], **phase_rows(predicted)}}
    for name, ledger in ledgers.items():
        columns[name] = {**ledger["categories"], **phase_rows(ledger)}
    return "\n".join(
        [
            f"{title}: each category's own peak over the step; then each phase's peak, all categories",
            format_table(columns),
            format_table(columns, PHASE_ROWS).split("\n", 1)[1],
        ]
    )


def estimate_report(
    model_name: str,
    shape: ModelShape,
    w: Workload,
    predicted: dict,
    fake: dict,
    seconds: float,
    fit_gib: float | None,
) -> str:
    """What `make estimate` prints: the usual quick math, then this run's bytes per rank, then what fits."""
    n = w.world_size
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
        f"(GB = 1e9 bytes), {n} ranks:",
        f"    {'':<44}{'whole model':>14}{'per rank':>14}",
    ]
    for row, whole, per_rank in quick_math_table(shape.num_params, n, w.precision):
        per = "" if math.isnan(per_rank) else f"{per_rank:.1f}"
        lines.append(f"    {row:<44}{whole:>14.1f}{per:>14}")
    fake_cols = {**fake["categories"], **phase_rows(fake)}
    columns = {"analytic": {**predicted["categories"], **phase_rows(predicted)}, "fake-measured": fake_cols}
    lines += [
        "",
        f"bytes per rank (GiB), rank 0 of {n}: each category's own peak; then each phase's peak "
        f"(fake-tensor step measured in {seconds:.0f} s)",
        format_table(columns),
        format_table(columns, PHASE_ROWS).split("\n", 1)[1],
        "",
        "activation checkpointing, analytic (GiB per rank):",
        f"    {'mode':<12}{'activations':>14}{'temporaries':>14}{'peak':>14}",
    ]
    for mode in MODES:
        p = predict(shape, replace(w, checkpointing=mode))
        c = p["categories"]
        lines.append(
            f"    {mode:<12}{c['activations'] / 2**30:>14.2f}{c['temporaries'] / 2**30:>14.2f}{p['peak'] / 2**30:>14.2f}"
        )
    if w.grad_accum_steps > 1 and not w.reduce_grads_every_microbatch:
        every = predict(shape, replace(w, reduce_grads_every_microbatch=True))
        lines += [
            "",
            f"{w.grad_accum_steps} micro-batches reduced once keep every whole gradient: unsharded grads "
            f"{predicted['categories']['unsharded grads'] / 2**30:.2f} GiB. With fsdp.reduce_grads_every_microbatch=true: "
            f"{every['categories']['unsharded grads'] / 2**30:.2f} GiB, peak {every['peak'] / 2**30:.2f} GiB "
            f"(analytic), for {w.grad_accum_steps}x the reduce-scatter traffic.",
        ]
    if fit_gib:
        answer = fits(shape, w, int(fit_gib * 2**30))
        lines += [
            "",
            f"does it fit in {fit_gib:g} GiB per rank? (analytic peak; leave room for the CUDA context)",
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
