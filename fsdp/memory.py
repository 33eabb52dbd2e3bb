"""Every byte of a rank's memory, three ways: predicted, measured, and measured without the hardware.

1. The analytic model (`predict`): bytes per rank for each category of the memory vocabulary,
   from the model's config and the run's settings, formulas written out below.
2. The measured ledger (`MemoryLedger`): PyTorch's FSDPMemTracker around real training steps,
   each tensor labelled by its role, the peak of each phase and of each category.
3. The estimate at scale (`fake_process_group` + the ledger): the same training step on fake
   tensors (shapes, no data) and a fake process group, so a laptop measures rank 0 of 8 GPUs.

The categories are the vocabulary of ARCHITECTURE.md, the same words in logs, TensorBoard,
memory.json, the README and the tests (`CATEGORIES`).
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed._tools.fsdp2_mem_tracker import _TOTAL_KEY, FSDPMemTracker, _FSDPModState, _FSDPRefType

from fsdp.shard import fsdp_units

if TYPE_CHECKING:
    from fsdp.dist import Dist

CATEGORIES = (
    "sharded params",  # this rank's rows of every parameter (fp32 master weights in mixed precision)
    "unsharded params",  # whole parameters of the units gathered now, in the compute dtype
    "sharded grads",  # this rank's rows of every gradient, after the reduce-scatter
    "unsharded grads",  # whole gradients of a unit, before its reduce-scatter (or accumulating)
    "optimizer state",  # AdamW's m and v (and step counters), sharded like the parameters
    "activations",  # tensors the forward saves for the backward
    "logits",  # the output head's vocabulary-wide slices, forward and backward
    "all-gather buffers",  # the flat buffer a unit's parameters are gathered into
    "reduce-scatter buffers",  # the flat buffer a unit's gradients are reduced from
    "temporaries",  # made and freed within the backward (activation gradients) or a step
    "inputs",  # the micro-batch's token ids, labels and positions
    "buffers",  # non-parameter state of the model (rotary frequencies)
)
PHASES = ("forward", "backward", "optimizer step")

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


def host_float(t: torch.Tensor, placeholder: float = math.nan) -> float:
    """float(t); under FakeTensorMode (a memory estimate) tensors have shapes but no values: `placeholder`."""
    return placeholder if isinstance(t, FakeTensor) else float(t)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# 1. The analytic model: bytes per rank, from the config and the settings.
# ---------------------------------------------------------------------------------------------

COMPUTE_BYTES = {"mixed": 2, "bf16": 2, "fp32": 4}  # the dtype layers run in (FSDP gathers in it)
REDUCE_BYTES = {"mixed": 4, "bf16": 2, "fp32": 4}  # the dtype gradients are reduce-scattered in
ACTIVATION_CHECKPOINTING = ("none", "every_k", "full")  # cheapest (least recompute) first


@dataclass(frozen=True)
class Workload:
    """What the analytic model needs to know about a run, besides the model."""

    world_size: int
    precision: str = "mixed"
    checkpointing: str = "none"  # none | full | every_k
    every_k: int = 1
    micro_batch_size: int = 1
    seq_len: int = 2048
    chunk_tokens: int = 1024  # loss.chunk_tokens
    grad_accum_steps: int = 1
    reduce_grads_every_microbatch: bool = False
    reshard_after_forward: bool = True
    device: str = "cuda"  # cpu | cuda: the one kernel whose memory differs (see reduce-scatter buffers)

    @classmethod
    def from_config(cls, cfg, world_size: int, grad_accum_steps: int, device: str = "cuda") -> Workload:
        return cls(
            device=device,
            world_size=world_size,
            precision=cfg.precision,
            checkpointing=cfg.activation_checkpointing.mode,
            every_k=cfg.activation_checkpointing.every_k,
            micro_batch_size=cfg.batch.micro_batch_size,
            seq_len=cfg.batch.max_seq_length,
            chunk_tokens=cfg.loss.chunk_tokens,
            grad_accum_steps=grad_accum_steps,
            reduce_grads_every_microbatch=cfg.fsdp.reduce_grads_every_microbatch,
            reshard_after_forward=cfg.fsdp.reshard_after_forward,
        )


@dataclass(frozen=True)
class ModelShape:
    """The sizes the formulas use, read off a meta-device build of the HF model (no memory)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    param_shapes: tuple[tuple[str, tuple[int, ...]], ...]  # every unique parameter, by qualified name
    layer_prefixes: tuple[str, ...]  # the decoder layers' qualified names
    buffer_bytes: int

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        from fsdp.model import build_model, find_decoder_layer_names

        model = build_model(config, torch.float32, on_meta=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            param_shapes=tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
            layer_prefixes=tuple(name + "." for name in find_decoder_layer_names(model)),
            buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        )

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.param_shapes)

    def unit_shapes(self) -> list[list[tuple[int, ...]]]:
        """Parameter shapes per FSDP unit: the root's (embeddings, final norm, head) first, then each layer's."""
        units: dict[str, list] = {"": []}
        for name, shape in self.param_shapes:
            prefix = next((p for p in self.layer_prefixes if name.startswith(p)), "")
            units.setdefault(prefix, []).append(shape)
        return list(units.values())


def sharded_numel(shapes: list[tuple[int, ...]], world_size: int) -> int:
    """Elements each rank stores: FSDP pads dim 0 up to a multiple of the world size, ceil(d0 / N) rows each."""
    return sum(-(-s[0] // world_size) * math.prod(s[1:]) for s in shapes)


def predict(shape: ModelShape, w: Workload) -> dict:
    """Bytes per rank of each category (its own peak over a step) and of each phase's peak.

    Notation: N ranks; T = micro_batch x seq tokens per forward; C = min(chunk_tokens, T) tokens
    per logits slice; h hidden, I intermediate, hq = heads x head_dim, hkv = kv_heads x head_dim,
    V vocabulary, L layers; p, c, r bytes of the parameter, compute and reduce dtypes (mixed:
    4, 2, 4; bf16: 2, 2, 2; fp32: 4, 4, 4). P_u is a unit's parameter count, padded to N.

    Model state (ZeRO paper, Rajbhandari et al. 2020, sec. 3.1: 16 bytes/param for mixed-precision
    Adam, here divided by N because every tensor is sharded):
      sharded params  = p * sum_params ceil(d0/N) * (other dims)
      sharded grads   = p * the same (the reduce-scatter output, cast to the parameter dtype)
      optimizer state = 2p * the same + 4 bytes of step counter per parameter tensor
    Gathered state (FSDP2, one unit per decoder layer plus the root; the root's parameters stay
    gathered from its forward to its backward):
      unsharded params   = c * (P_root + P_layer)            (reshard_after_forward=false: c * P)
      unsharded grads    = c * max(P_root, P_layer + untied head); when micro-batches accumulate
                           unreduced, FSDP keeps every whole gradient, upcast to r: r * P, plus
                           c * (P_layer + untied head) of the micro-batch's fresh gradients
                           (bf16, fp32: no upcast, the .grad itself accumulates: c * P)
      all-gather buffers = c * max(2 P_root, 3 P_layer)      flat output + its copy-out, and in
                           backward the next layer's flat output, prefetched (N > 1 only)
      reduce-scatter buffers = r * max(P_root, P_layer) * (1 + 1/N): the flat input and this
                           rank's output (N > 1 only); on CPU + r * P_u more: ATen's CPU kernel
                           for the copy-in (_chunk_cat) upcasts the gradients to r first, where
                           the CUDA kernel (and the fake one) writes into the flat input directly
    Activations, per token of a Llama-style layer, as the HF code saves them (Korthikanti et al.
    2022, "Reducing Activation Recomputation in Large Transformer Models", sec. 4.1, redone for
    RMSNorm, SwiGLU, grouped-query attention, a fused attention kernel and no dropout):
      A_layer = 2 x RMSNorm (4h fp32 input + 4 rsqrt + 2ch normalized and scaled)
              + c (hq + 2 hkv) query, key, value + 4 heads (softmax statistics) + c hq output
              + 4 c I (gate, SiLU, up, their product)
      A_root  = final RMSNorm (4h + 4 + 2ch) + its fp32 temporary (4h + 4) + rotary cos, sin (2 c hd)
      no checkpointing: T (L A_layer + A_root)
      checkpointed layers keep only their input, c h each, and a checkpointed layer's forward
      holds T (3 c I + 2 c h + 2 c hd) while it runs; in backward the recomputed layer is counted
      under temporaries.
    Logits (fsdp/loss.py: one slice of C tokens at a time, recomputed in backward):
      12 C V: the slice's fp32 log-softmax, its gradient and the fp32 logits' gradient.
    Temporaries, the largest of: the loss backward (3 c V h: two slices' output-head gradients
    and their sum, + c h (T + C) hidden-state gradients); the final norm's backward (5 x 4 h T
    fp32, + 2 c V h of head gradient with tied embeddings, + c P_layer of the layer gathered
    ahead);
    a layer's backward (T (2 c h + 2 c I), + T A_layer when it is recomputed); the optimizer
    step (4 p-sized bytes of the largest shard: AdamW's one denominator).
    """
    n = w.world_size
    p, c, r = (
        BYTES_PER_PARAM[w.precision]["sharded params"],
        COMPUTE_BYTES[w.precision],
        REDUCE_BYTES[w.precision],
    )
    h, inter, hd, vocab = shape.hidden, shape.intermediate, shape.head_dim, shape.vocab
    hq, hkv = shape.heads * hd, shape.kv_heads * hd
    tokens = w.micro_batch_size * w.seq_len
    chunk = min(w.chunk_tokens, tokens) if w.chunk_tokens > 0 else tokens
    n_chunks = -(-tokens // chunk)

    units = shape.unit_shapes()
    all_shapes = [s for u in units for s in u]
    padded = [sharded_numel(u, n) * n for u in units]  # a unit's gathered size, padding included
    p_root, p_layer, p_total = padded[0], max(padded[1:], default=0), sum(padded)
    head = 0 if shape.tied else vocab * h
    local = sharded_numel(all_shapes, n)
    largest_shard = max(sharded_numel([s], n) for s in all_shapes)

    a_norm = 4 * h + 4 + 2 * c * h
    a_layer = 2 * a_norm + c * (hq + 2 * hkv) + 4 * shape.heads + c * hq + 4 * c * inter
    a_root = a_norm + 4 * h + 4 + 2 * c * hd
    from fsdp.activation import checkpointed_layers

    n_ckpt = len(checkpointed_layers(shape.layers, w.checkpointing, w.every_k))
    saved = n_ckpt * c * h + (shape.layers - n_ckpt) * a_layer
    activations = tokens * (saved + a_root)
    if n_ckpt:
        activations = max(activations, tokens * (saved + 3 * c * inter + 2 * c * h + 2 * c * hd))

    accumulating = w.grad_accum_steps > 1 and not w.reduce_grads_every_microbatch
    # Accumulating without reducing, FSDP keeps each whole gradient: upcast to the reduce dtype
    # when it differs from the compute dtype (mixed: fp32, beside each micro-batch's fresh bf16
    # gradients of one unit), else in the parameter's own .grad.
    if not accumulating:
        unsharded_grads = c * max(p_root, p_layer + head)
    elif r != c:
        unsharded_grads = r * p_total + c * (p_layer + head)
    else:
        unsharded_grads = c * p_total
    cats = {
        "sharded params": p * local,
        "unsharded params": c * (p_total if not w.reshard_after_forward else p_root + p_layer),
        "sharded grads": p * local,
        "unsharded grads": unsharded_grads,
        "optimizer state": 2 * p * local + 4 * len(all_shapes),
        "activations": activations,
        "logits": 12 * chunk * vocab,
        # Alone (N = 1) FSDP still casts each unit to the compute dtype and copies the gradients
        # into a flat buffer, but gathers and scatters nothing: about one unit of each.
        "all-gather buffers": c * max(2 * p_root, 3 * p_layer) if n > 1 else c * p_layer,
        "reduce-scatter buffers": int(r * max(p_root, p_layer) * (1 + 1 / n + (w.device == "cpu")))
        if n > 1
        else 2 * r * max(p_root, p_layer),
        "temporaries": 0,
        "inputs": 3 * 8 * tokens * w.grad_accum_steps,  # ids, labels, positions (int64) of every micro-batch
        "buffers": shape.buffer_bytes,
    }
    layer_bw = tokens * (2 * c * h + 2 * c * inter + (a_layer if n_ckpt else 0))
    temporaries = {
        "loss backward": (3 if n_chunks > 1 else 1) * c * vocab * h + c * h * (tokens + chunk),
        "final norm backward": 5 * 4 * h * tokens + (2 * c * vocab * h if shape.tied else 0) + c * p_layer,
        "layer backward": layer_bw + (c * vocab * h if shape.tied else 0),
        "optimizer step": p * largest_shard,
    }
    cats["temporaries"] = max(temporaries.values())

    # Phase peaks: what is alive together at each phase's worst moment.
    state = cats["sharded params"] + cats["optimizer state"] + cats["inputs"] + cats["buffers"]
    accumulated = r * p_total if accumulating else 0
    forward = state + accumulated + c * p_root + tokens * (saved + a_root) + 8 * chunk * vocab
    loss_backward = (
        state
        + accumulated
        + c * p_root
        + tokens * (saved + a_root)
        + cats["logits"]
        + temporaries["loss backward"]
    )
    root_reduce = (
        state + p * (local - sharded_numel(units[0], n)) + c * p_root + cats["reduce-scatter buffers"]
    )
    layer_backward = (
        state
        + accumulated
        + c * (p_root + p_layer)
        + p * sharded_numel(units[-1], n)
        + tokens * saved
        + int(r * p_layer * (1 + 1 / n))
        + temporaries["layer backward"]
    )
    backward = max(loss_backward, root_reduce, layer_backward)
    step = state + cats["sharded grads"] + temporaries["optimizer step"]
    phases = {"forward": forward, "backward": backward, "optimizer step": step}
    return {
        "categories": cats,
        "phases": phases,
        "peak": max(phases.values()),
        "peak_phase": max(phases, key=phases.get),
        "temporaries": temporaries,
        "params": shape.num_params,
        # FSDP pads dim 0 of every parameter to a multiple of N: rows that hold nothing, on every rank.
        "padding elements": sum((-(-s[0] // n) * n - s[0]) * math.prod(s[1:]) for s in all_shapes),
    }


# ---------------------------------------------------------------------------------------------
# 2. The measured ledger: PyTorch's FSDPMemTracker, around real (or fake) training steps.
# ---------------------------------------------------------------------------------------------

# The tracker's reference types, in our vocabulary. "logits" is ours: the tracker calls them
# activations (forward) or temporaries (backward); the ledger sets them apart (see MemoryLedger).
_TRACKER_NAMES = {
    _FSDPRefType.SHARDED_PARAM: "sharded params",
    _FSDPRefType.UNSHARDED_PARAM: "unsharded params",
    _FSDPRefType.SHARDED_GRAD: "sharded grads",
    _FSDPRefType.UNSHARDED_GRAD: "unsharded grads",
    _FSDPRefType.OPT: "optimizer state",
    _FSDPRefType.ACT: "activations",
    _FSDPRefType.TEMP: "temporaries",
    _FSDPRefType.ALL_GATHER: "all-gather buffers",
    _FSDPRefType.REDUCE_SCATTER: "reduce-scatter buffers",
    _FSDPRefType.INP: "inputs",
    _FSDPRefType.BUFFER: "buffers",
}
_LOGITS = "logits"


class MemoryLedger(FSDPMemTracker):
    """FSDPMemTracker (torch.distributed._tools), with what a training step needs on top.

    The tracker sees every tensor allocation (a TorchDispatchMode) and labels each storage by its
    role, using FSDP's hooks: sharded/unsharded params and grads, all-gather and reduce-scatter
    buffers, optimizer state, activations (made in forward) and temporaries (made in backward).
    This subclass adds:
    - logits: floating tensors whose last dimension is the vocabulary (the output head's slices
      and their gradients), which the tracker would count as activations or temporaries;
    - the peak of each phase (forward, backward, optimizer step), category by category, and each
      category's own peak over the step: categories peak at different moments, so their peaks
      do not add up to the total peak;
    - several forwards per tracked region (gradient accumulation): the tracker refuses a second
      forward of the root unless its per-module statistics are reset first.
    Every figure is bytes of tensor storage on `device`, as this rank allocated them.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, vocab_size: int, device: torch.device
    ):
        super().__init__(model, optimizer)
        self._ref_class = [*_FSDPRefType, _LOGITS]  # the keys of the tracker's snapshots
        self.vocab_size = vocab_size
        self.device = device
        self._in_fsdp: str | None = None
        self._phase = "forward"
        self.reset()

    def reset(self) -> None:
        """Forget the peaks (between steps); live tensors stay tracked."""
        self.phase_peaks: dict[str, dict[str, int]] = {}
        self.category_peaks: dict[str, int] = dict.fromkeys(CATEGORIES, 0)

    def phase(self) -> str:
        """forward from the root's pre-forward, backward from the first pre-backward (gradient
        clipping included), optimizer step inside `optimizer.step()`."""
        return "optimizer step" if self._in_opt else self._phase

    def current(self) -> dict[str, int]:
        """The live bytes by category now, in our vocabulary."""
        snap = self._curr_mem_snap.get(self.device, {})
        out = dict.fromkeys(CATEGORIES, 0)
        for ref, nbytes in snap.items():
            if ref != _TOTAL_KEY:
                out[_TRACKER_NAMES.get(ref, ref)] += nbytes
        return out

    def _track(self, reftype, t: torch.Tensor) -> None:
        if reftype == _FSDPRefType.OPT and self._in_opt:
            # Made inside optimizer.step(): a temporary unless the step keeps it as state (the
            # tracker's post-step hook labels the optimizer's state tensors again).
            reftype = _FSDPRefType.TEMP
        elif reftype in (_FSDPRefType.ACT, _FSDPRefType.TEMP):
            if t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == self.vocab_size:
                reftype = _LOGITS
            elif self._in_fsdp == "gather":
                reftype = _FSDPRefType.ALL_GATHER
            elif self._in_fsdp == "reduce":
                reftype = _FSDPRefType.REDUCE_SCATTER
            elif self._in_fsdp == "accumulate":
                reftype = _FSDPRefType.UNSHARDED_GRAD
        super()._track(reftype, t)

    def _label_unsharded_grads(self) -> None:
        """Whole gradients waiting for their unit's reduce-scatter are unsharded grads, not temporaries.

        The tracker labels them only when their unit's post-backward runs; the root's (embeddings,
        output head) are made first in backward and reduced last, and under gradient accumulation
        every unit keeps them (fp32) from one micro-batch to the next.
        """
        for unit in fsdp_units(self._root_mod):
            group = unit._get_fsdp_state()._fsdp_param_group
            for fsdp_param in group.fsdp_params if group else ():
                unsharded = getattr(fsdp_param, "_unsharded_param", None)  # made at the first forward
                for grad in (getattr(unsharded, "grad", None), fsdp_param.unsharded_accumulated_grad):
                    if grad is not None:
                        self._update_and_maybe_create_winfos(grad, _FSDPRefType.UNSHARDED_GRAD)

    def _inside(self, what: str, fn):
        """Run an FSDP hook with `what` set ("gather", "reduce", "accumulate"): what it allocates is of that kind."""

        def run(*args, **kwargs):
            self._in_fsdp = what
            try:
                return fn(*args, **kwargs)
            finally:
                self._in_fsdp = None

        return run

    def _fsdp_state_pre_forward(self, fsdp_mod, orig_fsdp_state_pre_fw):
        inner = super()._fsdp_state_pre_forward(fsdp_mod, self._inside("gather", orig_fsdp_state_pre_fw))

        def pre_forward(*args, **kwargs):
            if fsdp_mod is self._root_mod and not self._mod_tracker.is_bw:
                self._phase = "forward"
                self.reset_mod_stats()  # a new micro-batch: per-module statistics restart
                self._label_unsharded_grads()
            return inner(*args, **kwargs)

        return pre_forward

    def _fsdp_param_group_pre_backward(self, fsdp_mod, orig_pre_backward):
        inner = super()._fsdp_param_group_pre_backward(fsdp_mod, self._inside("gather", orig_pre_backward))

        def pre_backward(*args, **kwargs):
            self._phase = "backward"
            self._label_unsharded_grads()
            return inner(*args, **kwargs)

        return pre_backward

    def _fsdp_param_group_post_backward(self, fsdp_mod, orig_post_backward):
        # A micro-batch that does not reduce only upcasts its whole gradients to accumulate them.
        group = fsdp_mod._get_fsdp_state()._fsdp_param_group
        reduce = self._inside("reduce", orig_post_backward)
        accumulate = self._inside("accumulate", orig_post_backward)

        def post_backward(*args, **kwargs):
            return (reduce if group.reduce_grads else accumulate)(*args, **kwargs)

        return super()._fsdp_param_group_post_backward(fsdp_mod, post_backward)

    def _update_peak_stats(self, peak_state) -> None:
        super()._update_peak_stats(peak_state)
        now = self.current()
        total = sum(now.values())
        phase = self.phase()
        if total > self.phase_peaks.get(phase, {}).get("total", -1):
            self.phase_peaks[phase] = {**now, "total": total}
        for name, nbytes in now.items():
            if nbytes > self.category_peaks[name]:
                self.category_peaks[name] = nbytes

    def module_peaks(self) -> dict[str, dict[str, int]]:
        """Per FSDP unit: the total live bytes at its forward and backward peaks (last micro-batch)."""
        out = {}
        for stats in self.memory_tracking.values():
            row = {}
            for state, key in ((_FSDPModState.PEAK_FW, "forward"), (_FSDPModState.PEAK_BW, "backward")):
                snaps = stats.snapshots.get(state)
                if snaps and self.device in snaps[-1]:
                    row[key] = snaps[-1][self.device][_TOTAL_KEY]
            out[stats.mod_fqn] = row
        return out

    def result(self) -> dict:
        """The step's ledger: each phase's peak by category, each category's own peak, the peak."""
        phases = {p: self.phase_peaks[p] for p in PHASES if p in self.phase_peaks}
        return {
            "phases": phases,
            "categories": dict(self.category_peaks),
            "peak": max((v["total"] for v in phases.values()), default=0),
            "peak_phase": max(phases, key=lambda p: phases[p]["total"]) if phases else None,
            "modules": self.module_peaks(),
        }


# ---------------------------------------------------------------------------------------------
# 3. The estimate at scale: rank 0 of N, on fake tensors, on any laptop.
# ---------------------------------------------------------------------------------------------


@contextmanager
def fake_process_group(world_size: int) -> Iterator[Dist]:
    """Be rank 0 of `world_size` ranks that do not exist: collectives return at once, moving nothing.

    The device mesh is made here, outside FakeTensorMode (inside, its bookkeeping tensors would
    be fake too); the model, optimizer and batches are then made inside the fake mode, so every
    tensor has a shape, a dtype and a device but no memory, and a step of an 8B model runs on a
    laptop while the ledger records what rank 0 would allocate.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fsdp.dist import Dist

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("fsdp",))
        yield Dist(0, world_size, 0, world_size, torch.device("cpu"), "fake", mesh)
    finally:
        dist.destroy_process_group()


@contextmanager
def fake_tensors() -> Iterator[None]:
    """FakeTensorMode, with DTensor's shape propagation kept out of the ledger.

    DTensor works out each op's output shape by running the op on global-shape fake tensors, in
    the fake mode already active if there is one. Under our fake mode the tracker cannot tell
    those from the step's own tensors (it skips only ops of *another* fake mode) and would count
    a full-size copy of every gradient. Giving the propagation a fake mode of its own keeps them out.
    And transformers, seeing fake tensors, treats the step as traced: it cannot read positions
    to rule out packed sequences, so it builds a (seq x seq) causal mask and attention leaves its
    fused kernel. A real step of full unpacked sequences has no mask; we tell transformers so.
    """
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.tensor import _sharding_prop
    from transformers import masking_utils

    with (
        FakeTensorMode(),
        mock.patch.object(_sharding_prop, "detect_fake_mode", lambda *args: None),
        mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda *args, **kwargs: None),
        mock.patch.object(masking_utils, "_ignore_causal_mask_sdpa", lambda *args, **kwargs: True),
    ):
        yield


def fits(shape: ModelShape, w: Workload, budget_bytes: int, max_micro_batch: int = 64) -> dict[str, int]:
    """For each checkpointing mode, cheapest first: the largest micro-batch whose predicted peak fits (0: none)."""
    answer = {}
    for mode in ACTIVATION_CHECKPOINTING:
        best, micro = 0, 1
        while micro <= max_micro_batch:
            trial = replace(w, checkpointing=mode, micro_batch_size=micro)
            if predict(shape, trial)["peak"] > budget_bytes:
                break
            best, micro = micro, micro * 2
        answer[mode] = best
    return answer


def seed_table(num_params: int, world_size: int, precision: str) -> list[tuple[str, float, float]]:
    """The seed's "quick math" beside this code's model-state accounting: (row, GB whole, GB per rank).

    The seed counts 16-bit weights (2 bytes/param), AdamW's m and v (8) and 16-bit gradients (2)
    on one GPU: 12 bytes/param, 84 GB for 7B. This code keeps fp32 master weights and fp32
    gradients too (mixed: 4 + 4 + 8 = 16 bytes/param, the ZeRO paper's count), and shards all
    three over the ranks. GB here are 10^9 bytes, as the seed writes them.
    """
    gb = 1e9
    rows = [
        ("seed: weights, 16-bit (2 B/param)", 2 * num_params / gb, math.nan),
        ("seed: AdamW states (8 B/param)", 8 * num_params / gb, math.nan),
        ("seed: gradients, 16-bit (2 B/param)", 2 * num_params / gb, math.nan),
        ("seed: total, one GPU", 12 * num_params / gb, math.nan),
    ]
    for name, b in BYTES_PER_PARAM[precision].items():
        rows.append(
            (
                f"fulltune {precision}: {name} ({b} B/param)",
                b * num_params / gb,
                b * num_params / gb / world_size,
            )
        )
    total = sum(BYTES_PER_PARAM[precision].values())
    rows.append(
        (
            f"fulltune {precision}: model state ({total} B/param)",
            total * num_params / gb,
            total * num_params / gb / world_size,
        )
    )
    return rows


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


# ---------------------------------------------------------------------------------------------
# Around the training loop, and the reports.
# ---------------------------------------------------------------------------------------------


class StepMemory:
    """Around one training step: the host's peak RSS, CUDA's allocator peaks, and (tracked steps) the ledger.

    On CPU the process's peak resident set is reset before the step (/proc/self/clear_refs) and
    read after (VmHWM). On CUDA the allocator's peaks are reset and read, and with `snapshot` a
    file for pytorch.org/memory_viz records every allocation of the step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        vocab_size: int,
        d: Dist,
        micro_batches: list,
        track: bool,
        snapshot: Path | None = None,
    ):
        self.device = d.device
        self.ledger = MemoryLedger(model, optimizer, vocab_size, d.device) if track else None
        if self.ledger:
            for b in micro_batches:
                self.ledger.track_inputs((b.input_ids, b.labels, b.position_ids))
        self.snapshot = snapshot if d.device.type == "cuda" else None
        self.peak_rss = 0
        self.cuda: dict[str, int] = {}

    def __enter__(self) -> StepMemory:
        reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            if self.snapshot:
                torch.cuda.memory._record_memory_history(max_entries=200_000)
        if self.ledger:
            self.ledger.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.ledger:
            self.ledger.__exit__(*exc)
        self.peak_rss = peak_rss_bytes()
        if self.device.type == "cuda":
            self.cuda = {
                "cuda max allocated": torch.cuda.max_memory_allocated(self.device),
                "cuda max reserved": torch.cuda.max_memory_reserved(self.device),
            }
            if self.snapshot:
                torch.cuda.memory._dump_snapshot(str(self.snapshot))
                torch.cuda.memory._record_memory_history(enabled=None)

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars in GiB: the host peak every step; each category's peak on tracked steps."""
        out = {"memory/host peak RSS": self.peak_rss / 2**30}
        out.update({f"memory/{k}": v / 2**30 for k, v in self.cuda.items()})
        if self.ledger:
            out.update({f"memory/{k}": v / 2**30 for k, v in self.ledger.category_peaks.items()})
            out["memory/peak"] = (
                max((p["total"] for p in self.ledger.phase_peaks.values()), default=0) / 2**30
            )
        return out

    def result(self) -> dict:
        return {**self.ledger.result(), "host peak RSS": self.peak_rss, **self.cuda}


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
    """What `make estimate` prints: the seed's quick math, then this run's bytes per rank, then what fits."""
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
        f"the seed's quick math, and this code's model state (GB = 1e9 bytes), {n} ranks:",
        f"    {'':<44}{'whole model':>14}{'per rank':>14}",
    ]
    for row, whole, per_rank in seed_table(shape.num_params, n, w.precision):
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
    for mode in ACTIVATION_CHECKPOINTING:
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
