"""Every byte of a rank's memory, three ways: predicted, measured, and measured without the hardware.

1. Predicted (`predict`, analytic.py): bytes per rank for each category of the memory
   vocabulary, from the model's config and the run's settings, formulas written out there.
2. Measured (`MemoryLedger`, ledger.py): PyTorch's FSDPMemTracker around real training steps,
   each tensor labelled by its role, the peak of each phase and of each category; `StepMemory`
   goes around a step of the training loop with it, the host's peak RSS and CUDA's peaks.
3. Measured on fake tensors (measure.py: the ledger around a step under fsdp/fake.py): the
   same training step on tensors with shapes but no data and a process group that moves nothing,
   so a laptop measures rank 0 of 8 GPUs.

The categories are the memory vocabulary (`CATEGORIES`, with the phases `PHASES`, in
vocabulary.py): the same words in logs, TensorBoard, memory.json, the docs and the tests.
plan.py says what fits in a budget (the planner: every lever priced, the cheapest plans); report.py prints the views side by side; places.py says which
bytes live in host memory when fsdp.cpu_offload moves the model state there, or activation
offloading (fsdp/offload.py) what the layers save. The dtypes of each
precision mode, and so its bytes per parameter, come from fsdp/precision.py.
"""

from __future__ import annotations

from fsdp.memory.analytic import ModelShape, Workload, predict, sharded_numel
from fsdp.memory.ledger import MemoryLedger, StepMemory, peak_rss_bytes, reset_peak_rss
from fsdp.memory.plan import Answer, Hardware, Plan, plan, quick_math_table
from fsdp.memory.report import (
    PHASE_ROWS,
    columns,
    estimate_report,
    format_table,
    gib,
    has_places,
    phase_rows,
    plan_report,
    report,
)
from fsdp.memory.vocabulary import CATEGORIES, PHASES, PLACES

__all__ = [
    "CATEGORIES",
    "PHASES",
    "PHASE_ROWS",
    "PLACES",
    "Answer",
    "Hardware",
    "MemoryLedger",
    "ModelShape",
    "Plan",
    "StepMemory",
    "Workload",
    "columns",
    "estimate_report",
    "format_table",
    "gib",
    "has_places",
    "peak_rss_bytes",
    "phase_rows",
    "plan",
    "plan_report",
    "predict",
    "quick_math_table",
    "report",
    "reset_peak_rss",
    "sharded_numel",
]
