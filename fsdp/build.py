"""Build the model to train, in torchtitan's order: wrap -> activation checkpointing -> [compile] ->
[offload] -> shard -> load.

Why this order:
- wrap first: `TrainableCausalLM` returns the summed token loss, so the output head's logits are
  computed one slice at a time inside the root unit (fsdp/loss.py);
- activation checkpointing before sharding: the checkpoint wrapper sits *inside* each layer's FSDP
  unit, so the recomputation in backward uses the parameters FSDP gathered for that backward;
- torch.compile (`compile`) goes here: after checkpointing (it compiles the wrapped layer, so the
  recomputation is compiled too) and before sharding. Each layer's `forward` is compiled, not the
  module: FSDP's hooks run in `__call__`, outside the compiled region, and parameter names keep
  no `_orig_mod.` (checkpoints and the export see the same names either way). All layers share one
  code object, so the first step pays for one compilation per input shape (reported by train.py);
- activation offloading (`activation_offload`, fsdp/offload.py) after both: it wraps each layer's
  forward, checkpoint and compiled code included, so what the checkpoint or the compiled graph
  saves goes through its hooks, and before sharding: FSDP's hooks run around it, the layer's
  weights are gathered by the time it looks at them;
- shard before load: a pretrained model is built on the meta device and every parameter becomes
  a DTensor first, so each rank allocates and reads only its own rows of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fsdp.activation import apply_activation_checkpointing
from fsdp.dist import Dist
from fsdp.model import TrainableCausalLM, build_model, find_decoder_layer_names, load_pretrained, materialize
from fsdp.offload import offload_activations
from fsdp.precision import PRECISIONS
from fsdp.shard import ShardSettings, shard_model


@dataclass(frozen=True)
class BuildSettings:
    """How the model is wrapped and sharded: every choice the build makes, in one place."""

    precision: str = "mixed"  # fsdp/precision.py: mixed | bf16 | fp32
    checkpointing: str = "none"  # fsdp/activation.py MODES: none | selective | every_k | full
    every_k: int = 1
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    chunk_tokens: int = 1024  # tokens per slice of output-head logits (fsdp/loss.py)
    reduce_dtype: str | None = None  # fsdp/precision.py's names; None: the precision's own
    split_root: bool = False  # fsdp/shard.py: torchtitan's root units
    explicit_prefetch: int = 0  # fsdp/shard.py: units whose all-gathers are issued ahead
    compile: bool = False  # torch.compile each decoder layer's forward
    activation_offload: bool = False  # fsdp/offload.py: what the layers save waits in host memory

    def shard_settings(self) -> ShardSettings:
        return ShardSettings(
            self.precision,
            self.reduce_dtype,
            self.reshard_after_forward,
            self.cpu_offload,
            self.split_root,
            self.explicit_prefetch,
        )


def build_sharded_model(
    hf_config,
    distributed: Dist,
    settings: BuildSettings | None = None,
    *,
    pretrained: Path | None = None,
    seed: int = 0,
    load_weights: bool = True,
) -> TrainableCausalLM:
    """The HF model for `hf_config`, wrapped for training, checkpointed and sharded over `distributed.mesh`.

    With `pretrained`, the model is built on the meta device and each rank reads only its rows of
    the weights (not when `load_weights` is false: a checkpoint is about to overwrite them); without,
    it is initialized from `seed` on the host (small models only) and sharded.
    """
    settings = settings or BuildSettings()
    storage = PRECISIONS[settings.precision].storage
    model = TrainableCausalLM(
        build_model(hf_config, storage, on_meta=pretrained is not None, seed=seed), settings.chunk_tokens
    )
    layer_names = find_decoder_layer_names(model)
    apply_activation_checkpointing(model, layer_names, settings.checkpointing, settings.every_k)
    if settings.compile:
        compile_layers(model, layer_names)
    if settings.activation_offload:
        offload_activations(model, layer_names, distributed.device)
    shard_model(model, layer_names, distributed.mesh, settings.shard_settings())
    if pretrained is not None:
        materialize(model, distributed.device)
        if load_weights:
            load_pretrained(model.causal_lm, pretrained)
    return model


def compile_layers(model: nn.Module, layer_names: list[str]) -> None:
    """torch.compile the forward of each decoder layer (checkpoint wrapper included), in place."""
    for name in layer_names:
        layer = model.get_submodule(name)
        layer.forward = torch.compile(layer.forward)


def compile_seconds() -> float:
    """Seconds this process has spent in torch.compile (dynamo tracing + inductor codegen), so far."""
    from torch._dynamo.utils import compile_times

    names, seconds = compile_times(repr="csv", aggregate=True)
    return dict(zip(names, map(float, seconds), strict=True)).get("_compile.compile_inner", 0.0)
