"""Activation offloading: what each decoder layer's forward saves for backward waits in host memory.

Saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks, the mechanism of torch's save_on_cpu
and torchtune's OffloadActivations) around each decoder layer's forward: a tensor autograd saves
there is copied to host memory when it is saved (pinned, non_blocking, on CUDA) and copied back to
the device when the backward unpacks it, so the device holds only the layer running now and, in
backward, the tensors of the node being run. Kept on the device:
- parameters: FSDP's gathered weights, which the matmuls save; backward gathers them again anyway;
- what the layer receives that no gradient flows through (rotary cos and sin, masks): the same
  tensors for every layer, held by the root throughout; copied per layer, L copies on the host;
- tensors under MIN_BYTES (a norm's per-token statistics at small batches): not worth a copy.
A storage saved several times, as one tensor or as views of it (a norm's output, the input of the
q, k and v projections; attention's output and the output projection's input), is copied once per
layer call, whole.

With activation checkpointing the checkpoint saves each checkpointed layer's input through these
hooks and nothing else (what the layer makes is saved inside the checkpoint's own, inner hooks and
recomputed in backward): offloading then moves exactly what checkpointing keeps. `selective` keeps
its matmul outputs in the checkpoint's own cache, out of the hooks' reach: only the layer inputs move.

The copies run on the compute stream: each waits for the kernels before it, and the copies' time
is not hidden behind compute (torchtune overlaps them on a second stream). On a CPU run host and
device are one memory: the copies cost time and save nothing, but the ledger still books them
apart (fsdp/memory/ledger.py), so a CPU run shows what a GPU would hold where.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

MIN_BYTES = 1024  # torchtune's threshold
_ATTRIBUTE = "activation_offload"  # on the model: how the ledger finds the hooks


class HostCopy:
    """A storage's copy in host memory, shared by every saved view of it; in backward, the copy
    brought back, held from the first view's unpacking to the last: each byte crosses once each way."""

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.host = host  # the whole storage, flat, in the saved tensors' dtype
        self.device = device
        self.pending = 0  # views saved and not yet unpacked
        self.back: torch.Tensor | None = None

    def unpacked(self) -> torch.Tensor:
        if self.back is None:
            self.back = torch.empty_like(self.host, device=self.device).copy_(self.host, non_blocking=True)
        whole = self.back
        self.pending -= 1
        if self.pending <= 0:  # the last one: the device copy lives as long as its users
            self.back = None
        return whole


class Offloaded(NamedTuple):
    """A saved tensor: the host copy of its storage, and the view of the storage it was."""

    copy: HostCopy
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _storage_id(t: torch.Tensor) -> int:
    """The address of a tensor's storage: the same for every view of it, fake tensors included."""
    return t.untyped_storage()._cdata


class ActivationOffload:
    """The saved-tensor hooks of every offloaded layer, and what they need while a layer runs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kept: set[int] = set()  # storages of the running layer that stay on the device
        # The running layer's host copies, by storage (held weakly, so that its address cannot be
        # reused by another while the layer runs), dtype and version (an in-place write makes it
        # another tensor).
        self.copies: dict[tuple, tuple[StorageWeakRef, HostCopy]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor | Offloaded:
        """Autograd saves `t`: keep it, or copy it to host memory (once) and save the copy."""
        if t.device != self.device or _storage_id(t) in self.kept or t.numel() * t.element_size() < MIN_BYTES:
            return t
        key = (_storage_id(t), t.dtype, t._version)
        if key not in self.copies:
            whole = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
            host = torch.empty_like(whole, device="cpu", pin_memory=t.is_cuda)
            host.copy_(whole, non_blocking=True)
            self.copies[key] = (StorageWeakRef(t.untyped_storage()), HostCopy(host, t.device))
        copy = self.copies[key][1]
        copy.pending += 1
        return Offloaded(copy, t.shape, t.stride(), t.storage_offset())

    def unpack(self, packed: torch.Tensor | Offloaded) -> torch.Tensor:
        """The backward needs a saved tensor: the view of its storage's device copy (a copy on a CPU
        run too, where the host copy would do, so the ledger sees what a GPU would allocate)."""
        if not isinstance(packed, Offloaded):
            return packed
        return packed.copy.unpacked().as_strided(packed.size, packed.stride, packed.offset)

    def around(self, layer: nn.Module) -> None:
        """Make `layer`'s forward save to host memory (its forward replaced: its name, its parameters
        and the FSDP hooks around its call are untouched)."""
        forward = layer.forward

        @functools.wraps(forward)
        def offloaded(*args, **kwargs):
            if not torch.is_grad_enabled():  # evaluation and generation save nothing
                return forward(*args, **kwargs)
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.kept = {_storage_id(p) for p in layer.parameters()}  # gathered by now: FSDP's pre-hook ran
            self.kept |= {_storage_id(t) for t in inputs if not t.requires_grad}
            try:
                # self.pack and self.unpack are looked up at each call: the ledger wraps them.
                with saved_tensors_hooks(self.pack, self.unpack):
                    return forward(*args, **kwargs)
            finally:
                self.kept, self.copies = set(), {}

        layer.forward = offloaded


def offload_activations(model: nn.Module, layer_names: list[str], device: torch.device) -> ActivationOffload:
    """Offload what each decoder layer (by qualified name) saves; the model keeps the hooks (see `activation_offload`)."""
    offload = ActivationOffload(device)
    for name in layer_names:
        offload.around(model.get_submodule(name))
    setattr(model, _ATTRIBUTE, offload)
    return offload


def activation_offload(model: nn.Module) -> ActivationOffload | None:
    """The model's activation offloading, if it has one (fsdp/memory/ledger.py books its copies)."""
    return getattr(model, _ATTRIBUTE, None)
