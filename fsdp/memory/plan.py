"""What fits: the largest micro-batch per checkpointing mode under a budget, and the model state in brief."""

from __future__ import annotations

import math
from dataclasses import replace

from fsdp.activation import MODES
from fsdp.memory.analytic import ModelShape, Workload, predict
from fsdp.precision import PRECISIONS


def fits(shape: ModelShape, w: Workload, budget_bytes: int, max_micro_batch: int = 64) -> dict[str, int]:
    """For each checkpointing mode, cheapest first: the largest micro-batch whose predicted peak on
    the device fits (0: none); offloaded, the host's memory is not the budget's."""
    answer = {}
    for mode in MODES:
        best, micro = 0, 1
        while micro <= max_micro_batch:
            trial = replace(w, checkpointing=mode, micro_batch_size=micro)
            if predict(shape, trial)["device"]["peak"] > budget_bytes:
                break
            best, micro = micro, micro * 2
        answer[mode] = best
    return answer


def quick_math_table(num_params: int, world_size: int, precision: str) -> list[tuple[str, float, float]]:
    """The usual quick math beside this code's model-state accounting: (row, GB whole, GB per rank).

    The common rule of thumb counts 16-bit weights (2 bytes/param), AdamW's m and v (8) and 16-bit
    gradients (2) on one GPU: 12 bytes/param, 84 GB for 7B. This code keeps fp32 master weights
    and fp32 gradients too (mixed: 4 + 4 + 8 = 16 bytes/param, the ZeRO paper's count), and shards
    all three over the ranks. GB here are 10^9 bytes, as the rule of thumb is usually written.
    """
    gb = 1e9
    rows = [
        ("quick math: weights, 16-bit (2 B/param)", 2 * num_params / gb, math.nan),
        ("quick math: AdamW states (8 B/param)", 8 * num_params / gb, math.nan),
        ("quick math: gradients, 16-bit (2 B/param)", 2 * num_params / gb, math.nan),
        ("quick math: total, one GPU", 12 * num_params / gb, math.nan),
    ]
    bytes_per_param = PRECISIONS[precision].bytes_per_param
    for name, b in bytes_per_param.items():
        rows.append(
            (
                f"fulltune {precision}: {name} ({b} B/param)",
                b * num_params / gb,
                b * num_params / gb / world_size,
            )
        )
    total = sum(bytes_per_param.values())
    rows.append(
        (
            f"fulltune {precision}: model state ({total} B/param)",
            total * num_params / gb,
            total * num_params / gb / world_size,
        )
    )
    return rows
