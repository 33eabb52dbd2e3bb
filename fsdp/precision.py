"""The precision modes, in one table: what each stores, computes in and reduces gradients in.

mixed: parameters stored fp32 (the master copy AdamW updates: bf16 has 8 bits of mantissa, so
       small updates to a bf16 weight round away), gathered in bf16 to compute, gradients
       reduce-scattered in fp32 (a sum over N ranks in bf16 would lose the small contributions).
bf16:  everything bf16, half the model state; the updates that round away are the price.
fp32:  everything fp32, the reference the others are checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the dtypes by the names configs use
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Precision:
    name: str  # mixed | bf16 | fp32
    storage: torch.dtype  # the sharded parameters, their gradients and AdamW's m and v
    compute: torch.dtype  # what layers run in, and FSDP gathers the parameters in
    reduce: torch.dtype  # what gradients are reduce-scattered (or accumulated unreduced) in

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
    def storage_label(self) -> str:
        return _DTYPE_NAMES[self.storage]

    @property
    def compute_label(self) -> str:
        return _DTYPE_NAMES[self.compute]

    @property
    def bytes_per_param(self) -> dict[str, int]:
        """Model state per parameter, before dividing by the world size. The ZeRO paper's 16 bytes/param
        of mixed-precision Adam is the mixed row: fp32 master weights, fp32 grads, fp32 m and v."""
        return {
            "sharded params": self.storage_bytes,
            "sharded grads": self.storage_bytes,  # the reduce-scatter's output, cast to the storage dtype
            "optimizer state": 2 * self.storage_bytes,  # AdamW's m and v
        }

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
