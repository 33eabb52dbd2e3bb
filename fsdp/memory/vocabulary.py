"""The memory vocabulary: the categories every byte of a rank's memory falls in, a step's phases,
and the places a byte lives in.

The same words in the logs, TensorBoard, memory.json, the docs and the tests.
"""

from __future__ import annotations

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
# Where a byte lives: the training device's memory, or (fsdp.cpu_offload) the host's. Without
# offloading every category is on the device; with it, OFFLOADED and the optimizer step's
# temporaries (AdamW runs on the host's shards) are on the host. Activation offloading
# (activation_checkpointing.offload) puts part of the activations there, what the layers save.
PLACES = ("host", "device")
OFFLOADED = ("sharded params", "sharded grads", "optimizer state")
