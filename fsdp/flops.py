"""FLOPs per token, achieved FLOP/s and MFU: how much of the hardware the step uses.

Model FLOPs per trained token (PaLM, Chowdhery et al. 2022, appendix B; torchtitan uses the same):

    6 x N  +  12 x L x H x Q x T

N: the parameters that do a matmul per token: every parameter except the input embedding table (a
lookup), plus the output projection even when it is tied to the embeddings (a tied head is still a
vocab x hidden matmul). 6 = 2 (multiply-add) x 3 (forward, and backward for activations and for
weights). L layers, H attention heads of Q dimensions, T the sequence length: the attention
scores and the weighted sum (2 matmuls of T x HQ per token, 2 FLOPs each, x 3 for backward).
Causal masking is not discounted (PaLM's convention).

Hardware FLOPs add what this code recomputes, which MFU does not count: activation checkpointing
`full` and `every_k` recompute the forward of each checkpointed layer in backward (2 x its params
+ 4 x H x Q x T per token) but its last matmul: torch's non-reentrant checkpoint stops as soon as
every tensor the backward needs is remade, and nothing needs the MLP's down projection's output
(2 x hidden x intermediate per token less; counted by torch's FlopCounterMode, tests/test_comm.py).
The chunked loss (fsdp/loss.py) recomputes the output projection of each slice (2 x vocab x
hidden per token). `selective` adds nothing: it keeps every matmul's and attention's output and
recomputes only elementwise ops (norms, rotary, SiLU, products, sums), which this convention does
not count (fsdp/activation.py `recomputed_layers`: none).

MFU = model FLOPs per second per device / the device's dense bf16 peak. On a CPU there is no
trustworthy peak, so only the achieved FLOP/s is reported, unless `metrics.peak_tflops` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batch import Batch

# Dense bf16 tensor-core peaks per GPU, TFLOP/s, from the vendors' datasheets (no sparsity).
PEAK_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
}


@dataclass
class FlopsModel:
    matmul_params: int  # N above
    layer_params: int  # one decoder layer's parameters
    layers: int
    heads: int
    head_dim: int
    vocab_hidden: int  # vocab x hidden: the output projection
    down_params: int = 0  # hidden x intermediate: the MLP's down projection, not recomputed

    @classmethod
    def from_shape(cls, shape) -> FlopsModel:
        """From fsdp/memory/analytic.py's ModelShape (a meta-device build: every parameter, tied ones once)."""
        vocab_hidden = shape.vocab * shape.hidden
        layer = sum(math.prod(s) for s in shape.unit_shapes()[1])
        # Untied: the input table is a tensor of its own, a lookup. Tied: the one tensor is the head's.
        matmul = shape.num_params if shape.tied else shape.num_params - vocab_hidden
        down = shape.hidden * shape.intermediate
        return cls(matmul, layer, shape.layers, shape.heads, shape.head_dim, vocab_hidden, down)

    def model_flops_per_token(self, seq_len: int) -> float:
        return 6 * self.matmul_params + 12 * self.layers * self.heads * self.head_dim * seq_len

    def hardware_flops_per_token(self, seq_len: int, recomputed_layers: int = 0) -> float:
        """Model FLOPs plus the recomputed forwards: the layers whose matmuls run again in backward
        (fsdp/activation.py `recomputed_layers`: full's and every_k's checkpointed layers, none of
        selective's, whose recomputation is elementwise), each but its down projection, and the
        chunked loss's head."""
        attention_forward = 4 * self.heads * self.head_dim * seq_len
        recompute = recomputed_layers * (2 * (self.layer_params - self.down_params) + attention_forward)
        return self.model_flops_per_token(seq_len) + recompute + 2 * self.vocab_hidden


def device_peak_tflops(device_name: str, configured: float | None = None) -> float | None:
    """The configured peak, else the table's entry for a GPU name (e.g. "NVIDIA H100 80GB HBM3"), else None."""
    if configured:
        return float(configured)
    for name, peak in PEAK_TFLOPS.items():  # "H100 PCIe" is tried before "H100"
        if name in device_name:
            return peak
    return None


class Throughput:
    """Tokens/s and FLOP/s per rank for a step, and MFU where the device's peak is known."""

    def __init__(self, flops: FlopsModel, recomputed_layers: int, peak_tflops: float | None):
        self.flops, self.recomputed, self.peak_tflops = flops, recomputed_layers, peak_tflops

    def describe(self, seq_len: int) -> str:
        model = self.flops.model_flops_per_token(seq_len)
        hardware = self.flops.hardware_flops_per_token(seq_len, self.recomputed)
        peak = (
            f"MFU against {self.peak_tflops:g} TFLOP/s per rank"
            if self.peak_tflops
            else "no MFU (no known peak: metrics.peak_tflops=...)"
        )
        return (
            f"compute    {model / 1e9:.2f} GFLOP per token at {seq_len} tokens (6 x {self.flops.matmul_params:,} "
            f"+ attention), {hardware / model:.2f}x that with recomputation; {peak}"
        )

    def scalars(self, micro_batches: list[Batch], seconds: float) -> dict[str, float]:
        """This rank's: attention's cost uses each micro-batch's padded length."""
        tokens = sum(b.num_tokens for b in micro_batches)
        model_flops = sum(
            b.num_tokens * self.flops.model_flops_per_token(b.input_ids.shape[1]) for b in micro_batches
        )
        hardware_flops = sum(
            b.num_tokens * self.flops.hardware_flops_per_token(b.input_ids.shape[1], self.recomputed)
            for b in micro_batches
        )
        out = {
            "perf/tokens_per_s_per_rank": tokens / seconds,
            "perf/model_tflops_per_rank": model_flops / seconds / 1e12,
            "perf/hardware_tflops_per_rank": hardware_flops / seconds / 1e12,
        }
        if self.peak_tflops:
            out["perf/mfu"] = out["perf/model_tflops_per_rank"] / self.peak_tflops
        return out
