"""Every byte: what a rank's memory holds.

For now the host side: peak resident memory of this process, reset and read around a phase
(model loading), so a run can say what loading cost each rank. The per-category ledger of the
memory vocabulary (sharded params, sharded grads, optimizer state, activations, ...) builds on this.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

# Bytes per parameter of each model-state component, per precision mode, before dividing by the
# world size: (sharded params, sharded grads, optimizer state). The ZeRO paper's 16 bytes/param
# for mixed-precision Adam is the "mixed" row: fp32 master weights, fp32 grads, fp32 m and v.
BYTES_PER_PARAM = {
    "mixed": {"sharded params": 4, "sharded grads": 4, "optimizer state": 8},
    "bf16": {"sharded params": 2, "sharded grads": 2, "optimizer state": 4},
    "fp32": {"sharded params": 4, "sharded grads": 4, "optimizer state": 8},
}


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux). False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (Linux: VmHWM); elsewhere, since the process started."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
