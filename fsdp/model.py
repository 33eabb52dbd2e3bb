"""Build a Hugging Face causal LM without N full copies, find its decoder layers, load weights shard by shard.

The sequence for a pretrained model (`build_model` + `load_pretrained`):
1. build the model on the meta device: shapes and dtypes, no memory;
2. wrap it for training (`TrainableCausalLM`), checkpoint and shard it (fsdp/activation.py, fsdp/shard.py):
   every parameter becomes a DTensor holding only this rank's rows;
3. `materialize`: allocate each rank's shards (uninitialized) and recompute the buffers
   (rotary frequencies), which the meta device could not hold;
4. `load_pretrained`: each rank reads only its own rows of each tensor from the safetensors
   files (memory-mapped), so no rank ever holds the full model, not even in the file's dtype.
A random-init model (tests, the tiny preset) is small by definition: it is built whole on the
host from the seed, identical on every rank, and sharding keeps each rank's rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fsdp.activation import clean_name
from fsdp.dist import speaks_for_node
from fsdp.loss import chunked_cross_entropy_sum


class TrainableCausalLM(nn.Module):
    """A Hugging Face causal LM whose forward returns the summed token loss, not the logits.

    HF's own forward materializes fp32 logits for every position; we take the decoder's final
    hidden states and let fsdp/loss.py project them one slice at a time. This module is the FSDP
    root: the embeddings, final norm and (tied or not) output head live in its unit.
    """

    def __init__(self, causal_lm: nn.Module, chunk_tokens: int = 1024):
        super().__init__()
        config = causal_lm.config
        # Models that transform the logits after the output projection would train on the wrong loss here.
        for key, neutral in (
            ("final_logit_softcapping", None),
            ("logits_scaling", 1.0),
            ("logit_scale", None),
        ):
            if getattr(config, key, neutral) not in (neutral, None):
                raise NotImplementedError(
                    f"{type(causal_lm).__name__}: config.{key}={getattr(config, key)} transforms the logits, "
                    "which fsdp/loss.py does not apply yet"
                )
        self.causal_lm = causal_lm
        self.chunk_tokens = chunk_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """Summed token loss with `labels`; all logits without; with a KV `cache` (generation), the
        logits of the last position only. Generation goes through this forward too, because the
        root's FSDP hooks (gathering the embeddings and head) run around this module's forward."""
        decoder = self.causal_lm.get_decoder()
        hidden = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        ).last_hidden_state
        weight = self.causal_lm.get_output_embeddings().weight
        if cache is not None:
            hidden = hidden[:, -1]
        if labels is None:  # logits, for generation and tests
            return (hidden @ weight.t()).float()
        return chunked_cross_entropy_sum(hidden, weight, labels, self.chunk_tokens)


def resolve_model_folder(name_or_path: str) -> Path:
    """A local folder as is; a hub name downloaded once per node (by the rank that writes the
    node's caches, fsdp/dist.py first_of_node) while the others wait."""
    folder = Path(name_or_path).expanduser()
    if (folder / "config.json").is_file():
        return folder
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    if speaks_for_node():
        snapshot_download(name_or_path, allow_patterns=patterns)
    if dist.is_initialized():
        dist.barrier()
    return Path(snapshot_download(name_or_path, allow_patterns=patterns, local_files_only=True))


def load_hf_config(folder: str | Path, overrides: dict[str, Any] | None = None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return config


def build_model(config, dtype: torch.dtype, on_meta: bool, seed: int = 0) -> nn.Module:
    """The HF causal LM for `config`: on the meta device, or (random init) whole on the host from `seed`."""
    from transformers import AutoModelForCausalLM

    if on_meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def find_decoder_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the repeated decoder blocks, found generically.

    HF models list their block classes in `_no_split_modules` (the units that must not be split
    across devices): exactly the units we shard one by one. Tested for Llama, Mistral, Qwen2,
    Qwen3, Gemma, GPT-2, OLMo2 and Granite (tests/test_model.py).
    """
    hf_model = model.causal_lm if isinstance(model, TrainableCausalLM) else model
    block_classes = set(getattr(hf_model, "_no_split_modules", None) or [])
    names = [name for name, m in model.named_modules() if type(m).__name__ in block_classes]
    if not names:
        raise ValueError(
            f"{type(hf_model).__name__}: no decoder layers found (its _no_split_modules is {sorted(block_classes)})"
        )
    return names


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate the (sharded) parameters on `device` and recompute buffers the meta device left empty."""
    model.to_empty(device=device)
    hf_model = model.causal_lm if isinstance(model, TrainableCausalLM) else model
    for module in hf_model.modules():
        if any(True for _ in module.buffers(recurse=False)):
            # HF's own initializer knows each buffer (e.g. rotary inv_freq); parameters are loaded next.
            hf_model._init_weights(module)


def _safetensors_index(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors are read)"
    )


def shard_rows(dim0: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [start, end) of dim 0 that FSDP gives `rank`: torch.chunk's split, the last ranks possibly short."""
    per_rank = -(-dim0 // world_size)
    start = min(rank * per_rank, dim0)
    return start, min(start + per_rank, dim0)


@torch.no_grad()
def load_pretrained(causal_lm: nn.Module, folder: str | Path) -> int:
    """Copy each rank's rows of every parameter from the safetensors files. Returns bytes read.

    Works on FSDP-sharded parameters (DTensors sharded on dim 0) and on plain ones alike.
    Tied parameters appear once in `named_parameters`, so a tied output head is loaded once.
    """
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    folder = Path(folder)
    files = _safetensors_index(folder)
    params = {clean_name(name): p for name, p in causal_lm.named_parameters()}
    missing = sorted(set(params) - set(files))
    if missing:
        raise KeyError(f"{folder}: checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")

    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    bytes_read = 0
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                param = params[name]
                stored = f.get_slice(name)
                if list(stored.get_shape()) != list(param.shape):
                    raise ValueError(
                        f"{file.name}: {name} has shape {stored.get_shape()}, model wants {list(param.shape)}"
                    )
                if isinstance(param, DTensor):
                    local = param.to_local()
                    # The mesh dimension that shards (the last; under HSDP the first replicates).
                    mesh, dim = param.device_mesh, param.device_mesh.ndim - 1
                    start, end = shard_rows(param.shape[0], mesh.size(dim), mesh.get_coordinate()[dim])
                    rows = stored[start:end]
                    local.copy_(rows)
                else:
                    rows = stored[:]
                    param.copy_(rows)
                bytes_read += rows.numel() * rows.element_size()
    return bytes_read


def count_parameters(model: nn.Module) -> int:
    """Unique parameters of the full model (tied weights counted once), sharded or not."""
    return sum(p.numel() for p in model.parameters())
