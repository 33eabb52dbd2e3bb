"""Export: the sharded model, gathered one tensor at a time, written as a Hugging Face folder.

Every rank takes part (each `full_tensor()` is an all-gather), rank 0 alone writes. Rank 0 never
holds more than one safetensors file's worth of tensors (in the export dtype) plus the one tensor
being gathered, so exporting an 8B model needs neither a full fp32 copy nor a big host.
The folder appears by rename once complete: an interrupted export never looks like a model.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fsdp.activation import clean_name

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _write_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


@torch.no_grad()
def export_hf(
    causal_lm: nn.Module,
    out_dir: Path,
    tokenizer=None,
    dtype: str = "bf16",
    max_shard_bytes: int = 2000 * 2**20,
    is_main: bool = True,
) -> dict:
    """Write config, tokenizer and weights of `causal_lm` (sharded or not) to `out_dir`. Call on every rank."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    files: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes = total_bytes = 0
    part_paths: list[Path] = []
    for name, param in causal_lm.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        if not is_main:
            continue
        tensor = full.detach().to(device="cpu", dtype=DTYPES[dtype]).contiguous()
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            part_paths.append(tmp / f"part-{len(part_paths)}.safetensors")
            _write_file(current, part_paths[-1])
            files.append(dict.fromkeys(current))
            current, current_bytes = {}, 0
        current[clean_name(name)] = tensor
        current_bytes += size
        total_bytes += size
    if not is_main:
        return {}

    part_paths.append(tmp / f"part-{len(part_paths)}.safetensors")
    _write_file(current, part_paths[-1])
    files.append(dict.fromkeys(current))
    if len(part_paths) == 1:
        os.replace(part_paths[0], tmp / "model.safetensors")
    else:
        weight_map = {}
        for i, (path, names) in enumerate(zip(part_paths, files, strict=True)):
            final = f"model-{i + 1:05d}-of-{len(part_paths):05d}.safetensors"
            os.replace(path, tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config = copy.deepcopy(causal_lm.config)
    config.dtype = DTYPES[dtype]
    config.save_pretrained(tmp)
    if getattr(causal_lm, "generation_config", None) is not None:
        causal_lm.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return {"path": str(out_dir), "files": len(part_paths), "bytes": total_bytes}
