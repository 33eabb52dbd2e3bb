"""The measured ledger: PyTorch's FSDPMemTracker around real (or fake) training steps, in our vocabulary.

`MemoryLedger` labels every tensor a step allocates by its role and keeps each phase's and each
category's peak, and with fsdp.cpu_offload or activation offloading each place's (host, device)
too; `StepMemory` goes around one training step of the loop with the ledger (on the steps that
track), the host's peak resident set and CUDA's allocator peaks.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.fsdp2_mem_tracker import (
    _TOTAL_KEY,
    FSDPMemTracker,
    _FSDPModMemStats,
    _FSDPModState,
    _FSDPRefType,
)
from torch.distributed._tools.mem_tracker import _UpdateType
from torch.distributed.fsdp import FSDPModule

from fsdp.dist import Dist
from fsdp.memory.places import place
from fsdp.memory.vocabulary import CATEGORIES, PHASES, PLACES
from fsdp.offload import activation_offload
from fsdp.shard import fsdp_units


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
# Where a CPU run books the host copies of offloaded activations: host and device are one memory
# there, so the copies get a device key of their own, which no tensor of a step has.
_HOST_OF_A_CPU_RUN = torch.device("cpu", 1)


class _Peaks:
    """Each phase's peak (the bytes by category when their total peaked) and each category's own."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, int]] = {}
        self.categories: dict[str, int] = dict.fromkeys(CATEGORIES, 0)

    def update(self, phase: str, now: dict[str, int]) -> None:
        total = sum(now.values())
        if total > self.phases.get(phase, {}).get("total", -1):
            self.phases[phase] = {**now, "total": total}
        for name, nbytes in now.items():
            self.categories[name] = max(self.categories[name], nbytes)

    def result(self) -> dict:
        phases = {p: self.phases[p] for p in PHASES if p in self.phases}
        return {
            "phases": phases,
            "categories": dict(self.categories),
            "peak": max((v["total"] for v in phases.values()), default=0),
            "peak_phase": max(phases, key=lambda p: phases[p]["total"]) if phases else None,
        }


def offloaded(model: nn.Module) -> bool:
    """Whether FSDP keeps this model's shards in host memory (fsdp.cpu_offload)."""
    for unit in fsdp_units(model):
        group = unit._get_fsdp_state()._fsdp_param_group
        if group and any(p.offload_to_cpu for p in group.fsdp_params):
            return True
    return False


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
      forward of the root unless its per-module statistics are reset first;
    - the places: with fsdp.cpu_offload the tracker sees the offloaded model state on the CPU,
      apart from the GPU's bytes; the ledger keeps both, their sum, and each on its own ("host",
      "device" in `result`). With activation offloading (fsdp/offload.py) what its pack hook
      allocates, the host copies, is the host's activations, on a CPU run too (booked under a key
      of their own); what its unpack hook allocates in backward, the device copies, the device's.
    Every figure is bytes of tensor storage on `device` (and offloaded, in host memory), as this
    rank allocated them.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        vocab_size: int,
        device: torch.device,
        state_on_host: bool = False,
    ):
        super().__init__(model, optimizer)
        self._ref_class = [*_FSDPRefType, _LOGITS]  # the keys of the tracker's snapshots
        self.vocab_size = vocab_size
        self.device = device
        # Offloaded on a GPU, the host's bytes are the tracker's CPU snapshot (on a CPU run there is
        # one place: host and device are the same memory).
        self.places = {"device": [device]}
        if device.type != "cpu" and offloaded(model):
            self.places["host"] = [torch.device("cpu")]
        self.offload = activation_offload(model)
        self.host_copies = torch.device("cpu") if device.type != "cpu" else _HOST_OF_A_CPU_RUN
        # A step standing for an offloaded one where there is nothing to offload from (the
        # fake-tensor estimate, on one CPU): the model state is booked where CPUOffloadPolicy keeps it.
        self.state_on_host = state_on_host
        if self.offload or state_on_host:
            self.places["host"] = [self.host_copies]
        self._in_fsdp: str | None = None
        self._in_offload: str | None = None  # "pack" or "unpack": inside the offload's hooks
        self._phase = "forward"
        self.reset()

    def reset(self) -> None:
        """Forget the peaks (between steps); live tensors stay tracked."""
        self.peaks = {where: _Peaks() for where in (None, *self.places)}  # None: every place together

    @property
    def phase_peaks(self) -> dict[str, dict[str, int]]:
        return self.peaks[None].phases

    @property
    def category_peaks(self) -> dict[str, int]:
        return self.peaks[None].categories

    def phase(self) -> str:
        """forward from the root's pre-forward; backward from the moment autograd's backward runs
        (the loss's own backward included, which under split_root comes before any unit's
        pre-backward) to the optimizer step, gradient clipping included; optimizer step inside
        `optimizer.step()`."""
        if self._in_opt:
            return "optimizer step"
        if torch._C._current_graph_task_id() != -1:  # inside autograd's backward (ModTracker.is_bw)
            self._phase = "backward"
        return self._phase

    def current(self, where: str | None = None) -> dict[str, int]:
        """The live bytes by category now, in our vocabulary: in one place (device, host), or all."""
        devices = self.places[where] if where else [d for ds in self.places.values() for d in ds]
        out = dict.fromkeys(CATEGORIES, 0)
        for device in devices:
            for ref, nbytes in self._curr_mem_snap.get(device, {}).items():
                if ref != _TOTAL_KEY:
                    out[_TRACKER_NAMES.get(ref, ref)] += nbytes
        if where and self.state_on_host:
            every = self.current()
            phase = self.phase()
            for category in CATEGORIES:
                if category != "activations":  # the one category a place's device key decides
                    here = place(category, where, cpu_offload=True, phase=phase)
                    out[category] = every[category] if here else 0
        return out

    def _track(self, reftype, t: torch.Tensor) -> None:
        if self._in_offload:
            # An activation; the pack hook's new storage is the host copy (the device tensor it
            # copies reaches here too, through the hook's views of it).
            copies = [st for st in get_untyped_storages(t) if st not in self._WINFO]
            super()._track(_FSDPRefType.ACT, t)
            if self._in_offload == "pack":
                self._book_on_host(copies)
            return
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

    def _book_on_host(self, storages: list[torch.UntypedStorage]) -> None:
        """Move storages' bytes to the host's key: the host copies of offloaded activations."""
        for st in storages:
            winfo = self._WINFO[st][0]
            self._update_snap(_UpdateType.DEL, winfo)
            winfo.device = self.host_copies
            self._update_snap(_UpdateType.ADD, winfo)

    def __enter__(self) -> MemoryLedger:
        o = self.offload
        if o:  # the instance's hooks shadow the class's until __exit__
            o.pack = self._inside("pack", o.pack, flag="_in_offload")
            o.unpack = self._inside("unpack", o.unpack, flag="_in_offload")
        super().__enter__()
        # Each micro-batch's forward starts at the root's forward, which the tracker hooks only
        # when the root unit holds parameters of its own (under split_root it holds none); this
        # hook runs first in either case.
        self._root_hook = self._root_mod.register_forward_pre_hook(self._micro_batch_starts, prepend=True)
        return self

    def _micro_batch_starts(self, *_) -> None:
        if not self._mod_tracker.is_bw:
            self._phase = "forward"
            self.reset_mod_stats()  # a new micro-batch: per-module statistics restart
            self._label_unsharded_grads()

    def __exit__(self, *exc) -> None:
        self._root_hook.remove()
        super().__exit__(*exc)
        if self.offload:
            del self.offload.pack, self.offload.unpack

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

    def _inside(self, what: str, fn, flag: str = "_in_fsdp"):
        """Run a hook with `flag` set to `what`: what it allocates is of that kind. FSDP's hooks
        ("gather", "reduce", "accumulate") set _in_fsdp; the activation offload's ("pack",
        "unpack") set _in_offload."""

        def run(*args, **kwargs):
            setattr(self, flag, what)
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, flag, None)

        return run

    def _instrument_fsdp_module(self) -> None:
        """The tracker wraps each FSDP module's hooks and its unit's backward methods, and restores
        them on exit, module by module. A unit of several modules (split_root's final norm + output
        head) shares one state: wrapped twice, the second wrap would save the first as the
        original, and exit would leave this ledger's wrappers in place for the next ledger to trip
        on. So the tracker sees each unit through its first module alone (the head runs no forward
        of its own: the loss reads its weight, gathered by the group's pre-forward at the norm)."""
        root = self._root_mod

        def first_module_of_each_unit() -> list[nn.Module]:
            seen, out = set(), []
            for module in type(root).modules(root):
                if isinstance(module, FSDPModule):
                    state = id(module._get_fsdp_state())
                    if state in seen:
                        continue
                    seen.add(state)
                out.append(module)
            return out

        root.modules = first_module_of_each_unit  # the two loops of the tracker's instrumentation
        try:
            super()._instrument_fsdp_module()
        finally:
            del root.modules

    def _fsdp_state_pre_forward(self, fsdp_mod, orig_fsdp_state_pre_fw):
        inner = super()._fsdp_state_pre_forward(fsdp_mod, self._inside("gather", orig_fsdp_state_pre_fw))

        return inner

    def _fsdp_param_group_pre_backward(self, fsdp_mod, orig_pre_backward):
        inner = super()._fsdp_param_group_pre_backward(fsdp_mod, self._inside("gather", orig_pre_backward))

        def pre_backward(*args, **kwargs):
            self._phase = "backward"
            self._label_unsharded_grads()
            self._module_stats(fsdp_mod)
            return inner(*args, **kwargs)

        return pre_backward

    def _fsdp_param_group_post_backward(self, fsdp_mod, orig_post_backward):
        # A micro-batch that does not reduce only upcasts its whole gradients to accumulate them.
        group = fsdp_mod._get_fsdp_state()._fsdp_param_group
        reduce = self._inside("reduce", orig_post_backward)
        accumulate = self._inside("accumulate", orig_post_backward)

        def post_backward(*args, **kwargs):
            return (reduce if group.reduce_grads else accumulate)(*args, **kwargs)

        inner = super()._fsdp_param_group_post_backward(fsdp_mod, post_backward)

        def post_backward_with_stats(*args, **kwargs):
            self._module_stats(fsdp_mod)
            return inner(*args, **kwargs)

        return post_backward_with_stats

    def _module_stats(self, fsdp_mod: nn.Module) -> None:
        """The tracker keeps statistics per FSDP module, made when its forward starts. One unit of
        several modules (split_root's final norm + output head, on a model whose head is not tied
        to the embeddings) runs one forward hook for the group, and the head, whose weight the loss
        reads in slices, never runs its own forward: its statistics are made here, before its
        backward hooks read them."""
        if fsdp_mod not in self.memory_tracking:
            names = {id(module): name for name, module in self._root_mod.named_modules()}
            self.memory_tracking[fsdp_mod] = _FSDPModMemStats(
                names.get(id(fsdp_mod), type(fsdp_mod).__name__)
            )

    def _update_peak_stats(self, peak_state) -> None:
        super()._update_peak_stats(peak_state)
        self._record()

    def _record(self) -> None:
        """The live bytes now, into the peaks of this phase: all places together, and each place."""
        phase = self.phase()
        for where, peaks in self.peaks.items():
            peaks.update(phase, self.current(where))

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
        """The step's ledger: each phase's peak by category, each category's own peak, the peak;
        offloaded, the same of each place ("host", "device"), each at its own peak moments."""
        out = {**self.peaks[None].result(), "modules": self.module_peaks()}
        if "host" in self.places:
            out.update({where: self.peaks[where].result() for where in PLACES})
        return out


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
        *,
        vocab_size: int,
        distributed: Dist,
        micro_batches: list,
        track: bool,
        snapshot: Path | None = None,
    ):
        self.device = distributed.device
        self.ledger = MemoryLedger(model, optimizer, vocab_size, distributed.device) if track else None
        if self.ledger:
            for b in micro_batches:
                self.ledger.track_inputs((b.input_ids, b.labels, b.position_ids))
        self.snapshot = snapshot if distributed.device.type == "cuda" else None
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
            if "host" in self.ledger.places:
                out.update(
                    {f"memory/{w} peak": self.ledger.peaks[w].result()["peak"] / 2**30 for w in PLACES}
                )
        return out

    def result(self) -> dict:
        return {**self.ledger.result(), "host peak RSS": self.peak_rss, **self.cuda}
