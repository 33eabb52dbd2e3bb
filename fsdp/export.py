"""The Hugging Face export: a model folder that `from_pretrained` loads, from the live sharded
model at the end of a run, or from a checkpoint on disk (`python -m fsdp.export CKPT OUT`).

Every rank takes part in the live export (each `full_tensor()` is an all-gather), rank 0 alone
writes. Rank 0 never holds more than one safetensors file's worth of tensors (in the export dtype)
plus the one tensor being gathered, so exporting an 8B model needs neither a full fp32 copy nor a
big host. The folder appears by rename once complete and fsynced: an interrupted export never looks like a model
(`export_problem` tells a whole folder from a torn one).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from durable import publish_folder, write_atomic, write_json
from fsdp.activation import clean_name
from fsdp.checkpoint import CheckpointError, verify_checkpoint
from fsdp.precision import DTYPES


def _write_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def export_problem(folder: Path) -> str | None:
    """What is wrong with an exported folder (missing, torn), or None if it is whole.

    Each safetensors file's header must parse and its tensors must end exactly at the end of the
    file; the index, when there is one, must name only files that are there.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return f"{folder}: no config.json"
    index = folder / "model.safetensors.index.json"
    try:
        names = (
            set(json.loads(index.read_text())["weight_map"].values())
            if index.is_file()
            else {"model.safetensors"}
        )
    except (ValueError, KeyError) as err:
        return f"{index}: unreadable ({err})"
    for name in sorted(names):
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else size
            try:
                header = json.loads(f.read(length)) if 8 + length <= size else None
            except ValueError:
                header = None
        if header is None:
            return f"{path}: torn (its header does not parse)"
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + length + end != size:
            return f"{path}: torn ({size} bytes, its header describes {8 + length + end})"
    return None


class HFFolderWriter:
    """Tensors in, a Hugging Face folder out: safetensors files of at most `max_shard_bytes` each
    (split with an index past it), written to `out_dir.tmp` and renamed when complete.

    It holds one file's worth of tensors at a time. Both exports use it (from the live sharded
    model, from a checkpoint on disk), so they write the same bytes.
    """

    def __init__(self, out_dir: Path, dtype: str = "bf16", max_shard_bytes: int = 2000 * 2**20):
        self.out_dir = Path(out_dir)
        self.tmp = self.out_dir.with_name(self.out_dir.name + ".tmp")
        self.dtype, self.max_shard_bytes = dtype, max_shard_bytes
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = self.total_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to(device="cpu", dtype=DTYPES[self.dtype]).contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_shard_bytes:
            self._flush()
        self.current[name] = tensor
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.tmp / f"part-{len(self.parts)}.safetensors"
        _write_file(self.current, path)
        self.parts.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self, config, generation_config=None, tokenizer=None) -> dict:
        self._flush()
        if len(self.parts) == 1:
            os.replace(self.parts[0][0], self.tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, (path, names) in enumerate(self.parts):
                final = f"model-{i + 1:05d}-of-{len(self.parts):05d}.safetensors"
                os.replace(path, self.tmp / final)
                weight_map.update(dict.fromkeys(names, final))
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            write_json(self.tmp / "model.safetensors.index.json", index, indent=2)
        config = copy.deepcopy(config)
        config.dtype = DTYPES[self.dtype]
        config.save_pretrained(self.tmp)
        if generation_config is not None:
            generation_config.save_pretrained(self.tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)
        publish_folder(self.tmp, self.out_dir)
        return {"path": str(self.out_dir), "files": len(self.parts), "bytes": self.total_bytes}


@dataclass(frozen=True)
class ExportTarget:
    """Where a run's Hugging Face folder goes, in which dtype, and its largest safetensors file."""

    folder: Path
    dtype: str = "bf16"
    max_shard_bytes: int = 2000 * 2**20


@torch.no_grad()
def export_hf(causal_lm: nn.Module, target: ExportTarget, tokenizer=None, is_main: bool = True) -> dict:
    """Write config, tokenizer and weights of `causal_lm` (sharded or not) to `target.folder`. Call
    on every rank."""
    writer = HFFolderWriter(target.folder, target.dtype, target.max_shard_bytes) if is_main else None
    for name, param in causal_lm.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        if writer is not None:
            writer.add(clean_name(name), full)
    if writer is None:
        return {}
    return writer.finish(causal_lm.config, getattr(causal_lm, "generation_config", None), tokenizer)


def save_hf_files(folder: Path, config, tokenizer=None, generation_config=None) -> None:
    """The model's config (and tokenizer) beside a checkpoint, so it exports without the model folder."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


@torch.no_grad()
def export_checkpoint(
    checkpoint: Path, out_dir: Path, dtype: str = "bf16", max_shard_bytes: int = 2000 * 2**20
) -> dict:
    """A checkpoint on disk -> a Hugging Face folder, in one process: no GPU, no process group.

    Tensors are read one at a time from the DCP files (whatever the world size that wrote them),
    in the order and under the names the live export uses, so the two exports are identical.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    checkpoint = Path(checkpoint)
    meta = verify_checkpoint(checkpoint)
    hf = checkpoint / "hf"
    stored = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    writer = HFFolderWriter(out_dir, dtype, max_shard_bytes)
    for name, key in meta["parameters"]:
        info = stored[f"model.{key}"]
        tensor = torch.empty(info.size, dtype=info.properties.dtype)
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the point
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": {key: tensor}}, checkpoint_id=str(checkpoint), no_dist=True)
        writer.add(name, tensor)
        del tensor
    generation = GenerationConfig.from_pretrained(hf) if (hf / "generation_config.json").is_file() else None
    tokenizer = AutoTokenizer.from_pretrained(hf) if (hf / "tokenizer_config.json").is_file() else None
    return writer.finish(AutoConfig.from_pretrained(hf), generation, tokenizer)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fsdp.export",
        description="Export a DCP checkpoint to a Hugging Face folder, in one CPU process.",
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--max-shard-mb", type=int, default=2000)
    args = parser.parse_args(argv)
    try:
        report = export_checkpoint(args.checkpoint, args.out, args.dtype, args.max_shard_mb * 2**20)
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    print(f"{report['path']}: {report['files']} safetensors file(s), {report['bytes'] / 2**20:,.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
