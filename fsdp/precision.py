"""The precision modes, in one table: what each stores, computes in and reduces gradients in.

mixed: parameters stored fp32 (the master copy AdamW updates: bf16 has 8 bits of mantissa, so
       small updates to a bf16 weight round away), gathered in bf16 to compute, gradients
       reduce-scattered in fp32 (a sum over N ranks in bf16 would lose the small contributions).
bf16:  everything bf16, half the model state; the updates that round away are the price.
fp32:  everything fp32, the reference the others are checked against.
auto:  mixed where bf16 is native (GPUs with bf16; CPUs with AVX-512 BF16 or AMX), fp32 elsewhere:
       on an AVX2-only CPU a bf16 matmul is emulated, about 50x slower than in fp32.
"""

from __future__ import annotations

import dataclasses
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the dtypes by the names configs use
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Precision:
    name: str  # mixed | bf16 | fp32
    storage: torch.dtype  # the sharded parameters, their gradients and (unless `state`) AdamW's m and v
    compute: torch.dtype  # what layers run in, and FSDP gathers the parameters in
    reduce: torch.dtype  # what gradients are reduce-scattered (or accumulated unreduced) in
    state: torch.dtype | None = None  # AdamW's m and v (optim.state_dtype); None: the storage dtype

    @property
    def storage_bytes(self) -> int:
        return self.storage.itemsize

    @property
    def compute_bytes(self) -> int:
        return self.compute.itemsize

    @property
    def reduce_bytes(self) -> int:
        return self.reduce.itemsize

    @property
    def state_bytes(self) -> int:
        return (self.state or self.storage).itemsize

    @property
    def storage_label(self) -> str:
        return _DTYPE_NAMES[self.storage]

    @property
    def compute_label(self) -> str:
        return _DTYPE_NAMES[self.compute]

    @property
    def reduce_label(self) -> str:
        return _DTYPE_NAMES[self.reduce]

    @property
    def state_label(self) -> str:
        return _DTYPE_NAMES[self.state or self.storage]

    @property
    def bytes_per_param(self) -> dict[str, int]:
        """Model state per parameter, before dividing by the world size. The ZeRO paper's 16 bytes/param
        of mixed-precision Adam is the mixed row: fp32 master weights, fp32 grads, fp32 m and v
        (bf16 m and v, optim.state_dtype=bf16: 12)."""
        return {
            "sharded params": self.storage_bytes,
            "sharded grads": self.storage_bytes,  # the reduce-scatter's output, cast to the storage dtype
            "optimizer state": 2 * self.state_bytes,  # AdamW's m and v
        }

    def reducing_in(self, dtype_name: str | None) -> Precision:
        """The same mode with gradients reduced in `dtype_name` (fsdp.reduce_dtype); None keeps its own."""
        return self if dtype_name is None else dataclasses.replace(self, reduce=DTYPES[dtype_name])

    def keeping_state_in(self, dtype_name: str | None) -> Precision:
        """The same mode with AdamW's m and v in `dtype_name` (optim.state_dtype); None: the storage dtype."""
        return self if dtype_name is None else dataclasses.replace(self, state=DTYPES[dtype_name])

    def mixed_precision_policy(self) -> MixedPrecisionPolicy:
        """FSDP2's policy: the default (compute and reduce in the storage dtype) unless they differ."""
        if self.compute == self.storage and self.reduce == self.storage:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=self.reduce)


PRECISIONS = {
    p.name: p
    for p in (
        Precision("mixed", storage=torch.float32, compute=torch.bfloat16, reduce=torch.float32),
        Precision("bf16", storage=torch.bfloat16, compute=torch.bfloat16, reduce=torch.bfloat16),
        Precision("fp32", storage=torch.float32, compute=torch.float32, reduce=torch.float32),
    )
}


def get_precision(name: str, reduce_dtype: str | None = None, state_dtype: str | None = None) -> Precision:
    """The mode `name` (mixed | bf16 | fp32), its gradients reduced in `reduce_dtype` and AdamW's
    m and v kept in `state_dtype`, where given."""
    return PRECISIONS[name].reducing_in(reduce_dtype).keeping_state_in(state_dtype)


@dataclasses.dataclass(frozen=True)
class CPU:
    """What decides whether bf16 is fast on this host: its name, torch's vector capability, and
    whether its matmul units take bf16 natively (x86: AVX-512 BF16 or AMX; Arm: the BF16 extension)."""

    name: str
    capability: str  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...
    bf16_native: bool
    bf16_features: tuple[str, ...]  # the flags that make it native, of those present

    def describe(self) -> str:
        native = f"native bf16 ({', '.join(self.bf16_features)})" if self.bf16_native else "bf16 emulated"
        return f"{self.name}, {platform.machine()}, capability {self.capability}, {native}"


def this_cpu() -> CPU:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = re.search(r"^(?:model name|Model Name|Hardware)\s*: (.*)$", cpuinfo, re.M)
    try:  # torch's own view of the CPU, where this build has it
        flags = {k for k, v in torch._C._cpu._get_cpu_capability().items() if v is True}
    except (AttributeError, RuntimeError):
        flags = set()
    flags |= set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo))
    if platform.machine() in ("aarch64", "arm64") and re.search(r"^Features\s*:.*\bbf16\b", cpuinfo, re.M):
        flags.add("bf16")
    features = tuple(sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"}))
    return CPU(
        name.group(1).strip() if name else platform.processor() or "unknown CPU",
        torch.backends.cpu.get_cpu_capability(),
        bool(features),
        features,
    )


def choose_precision(requested: str, device_type: str) -> tuple[str, str]:
    """`requested` as the mode to run, and why in one line. Only `auto` is decided here: mixed where
    bf16 is native, fp32 where it would be emulated. `cuda` without a visible GPU is a GPU to come
    (estimate.py, explain.py), taken to have bf16 like every GPU since the A100."""
    if requested != "auto":
        return requested, f"{requested}, as asked"
    if device_type == "cuda":
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            return "fp32", f"fp32 (auto): {torch.cuda.get_device_name()} has no bf16"
        return "mixed", "mixed (auto): bf16 compute on the GPU, fp32 master weights"
    cpu = this_cpu()
    if cpu.bf16_native:
        return "mixed", f"mixed (auto): this CPU computes bf16 natively ({cpu.describe()})"
    return "fp32", (
        f"fp32 (auto): no native bf16 on this CPU ({cpu.describe()}), where bf16 matmuls run "
        "about 50x slower; precision=mixed forces them"
    )
