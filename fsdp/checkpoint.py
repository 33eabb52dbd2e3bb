"""Checkpoints (DCP, sharded, resumable) and the Hugging Face export.

A checkpoint is a folder `run_dir/checkpoints/step-NNNNNNNN/`:
  __R_0.distcp, .metadata   model and AdamW state, written by DCP: each rank writes only its shards,
                            and any number of ranks can read them back (DCP reshards on load)
  rank-R.pt                 rank R's random number generators (torch, CUDA, Python, numpy)
  meta.json                 step, data-loader position, world size, the resolved config, the model's
                            config.json and what must not change across a resume
  hf/                       the model's config and tokenizer, so the checkpoint exports on its own
  COMPLETE.json             the marker: every file's size and CRC-32, written last
It is written as `step-NNNNNNNN.tmp/` and renamed once every rank has finished and the marker is
on disk, so a folder without `.tmp` and with a marker that matches its files is complete. Older
checkpoints are deleted (`keep_last`) only after the new one is complete, renamed `.deleting`
first: a kill at any instant leaves the latest complete checkpoint as it was.

Export: every rank takes part (each `full_tensor()` is an all-gather), rank 0 alone writes. Rank 0 never
holds more than one safetensors file's worth of tensors (in the export dtype) plus the one tensor
being gathered, so exporting an 8B model needs neither a full fp32 copy nor a big host.
The folder appears by rename once complete: an interrupted export never looks like a model.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import sys
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from fsdp import faults
from fsdp.activation import clean_name

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _write_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


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
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = copy.deepcopy(config)
        config.dtype = DTYPES[self.dtype]
        config.save_pretrained(self.tmp)
        if generation_config is not None:
            generation_config.save_pretrained(self.tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)
        shutil.rmtree(self.out_dir, ignore_errors=True)
        os.replace(self.tmp, self.out_dir)
        return {"path": str(self.out_dir), "files": len(self.parts), "bytes": self.total_bytes}


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
    writer = HFFolderWriter(out_dir, dtype, max_shard_bytes) if is_main else None
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


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (DCP) and resume
# ---------------------------------------------------------------------------------------------

MARKER = "COMPLETE.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder or file and why."""


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders that carry a marker, oldest first (files are verified on load)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [
        p for p in root.glob("step-*") if p.name.removeprefix("step-").isdigit() and (p / MARKER).is_file()
    ]
    return sorted(found, key=step_of)


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    if sys.platform != "win32":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict,
    is_main: bool,
    keep_last: int | None = None,
    hf_files: callable | None = None,
) -> dict:
    """Write checkpoint `step` (every rank calls this). Returns its path, seconds and bytes.

    `meta` (JSON) is written by rank 0; `hf_files(folder)` writes the model's config and
    tokenizer there (rank 0), so the checkpoint exports without the original model folder.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    start = time.perf_counter()
    rank = dist.get_rank()
    final = checkpoints_dir(run_dir) / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died before, at this step
        tmp.mkdir(parents=True)
    dist.barrier()

    model_state, optimizer_state = get_state_dict(model, optimizer)
    keys = parameter_keys(model)
    missing = [key for _, key in keys if key not in model_state]
    if missing:  # the offline export reads these keys: a naming change must not pass silently
        raise CheckpointError(f"model state lacks {missing[:3]}: parameter names and state keys disagree")
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rank-{rank}.pt")
    if is_main:
        meta = {**meta, "step": step, "world_size": dist.get_world_size(), "parameters": keys}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if hf_files is not None:
            hf_files(tmp / "hf")
    faults.point("save")

    # Each rank checksums what it wrote; rank 0 writes the marker, then the rename publishes it.
    mine = [f for f in tmp.iterdir() if f.name.startswith((f"__{rank}_", f"rank-{rank}."))]
    if is_main:
        mine += [f for f in tmp.iterdir() if f.is_file() and not f.name.startswith(("__", "rank-"))]
        mine += [f for f in (tmp / "hf").rglob("*") if f.is_file()] if (tmp / "hf").is_dir() else []
    sums = {str(f.relative_to(tmp)): [f.stat().st_size, _crc32(f)] for f in mine}
    everyone: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sums)
    total = 0
    if is_main:
        files = {k: v for part in everyone for k, v in part.items()}
        total = sum(size for size, _ in files.values())
        marker = tmp / MARKER
        with marker.open("w") as f:
            json.dump({"step": step, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if keep_last:
            for old in complete_checkpoints(run_dir)[:-keep_last]:
                doomed = old.with_name(old.name + ".deleting")
                os.replace(old, doomed)  # no longer a checkpoint from this instant on
                faults.point("delete")
                shutil.rmtree(doomed)
        for leftover in checkpoints_dir(run_dir).glob("*.deleting"):
            shutil.rmtree(leftover, ignore_errors=True)
    dist.barrier()
    return {"path": str(final), "seconds": time.perf_counter() - start, "bytes": total}


def verify_checkpoint(path: Path, share: tuple[int, int] = (0, 1)) -> dict:
    """Check the marker and the files it lists (size, CRC-32). Returns meta.json's content.

    `share=(i, n)` checks every n-th file from the i-th: n ranks check a checkpoint together.
    """
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {MARKER}; the checkpoint was not completed (a save that died)")
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{marker}: unreadable marker ({err})") from None
    mine = sorted(files)[share[0] :: share[1]]
    for name, (size, crc) in ((n, files[n]) for n in mine):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{f}: {f.stat().st_size} bytes, the marker says {size}: truncated or rewritten"
            )
        if _crc32(f) != crc:
            raise CheckpointError(f"{f}: contents do not match the marker's CRC-32: corrupted")
    return json.loads((path / "meta.json").read_text())


def resolve_resume(run_dir: Path, resume: str | None) -> tuple[Path | None, dict | None, list[str]]:
    """The checkpoint to resume from: (path, its meta, warnings). `auto`: the latest that verifies.

    Every rank calls it: the ranks verify each candidate's files together, and decide together.
    `auto` with no checkpoint yet is a fresh start; a named path that does not verify is an error;
    `auto` passes over a damaged checkpoint to the previous complete one, and says so.
    """
    if resume is None:
        return None, None, []
    if resume == "auto":
        candidates = list(reversed(complete_checkpoints(run_dir)))
    else:
        candidates = [Path(resume)]
        if not candidates[0].is_dir():
            raise CheckpointError(f"resume={resume}: no such checkpoint folder")
    distributed = dist.is_initialized()
    share = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    warnings = []
    for path in candidates:
        error, meta = None, None
        try:
            meta = verify_checkpoint(path, share)
        except CheckpointError as err:
            error = str(err)
        errors = [error]
        if distributed:
            errors = [None] * share[1]
            dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        if first is None:
            return path, meta, warnings
        if resume != "auto":
            raise CheckpointError(first)
        warnings.append(f"skipping a damaged checkpoint: {first}")
    return None, None, warnings


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model and AdamW state (resharded to this world size) and this rank's RNG state, if saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # DCP wraps per-rank failures; keep the first line, name the folder
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: DCP could not load it into this model: {first}") from err
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rng = Path(path) / f"rank-{dist.get_rank()}.pt"
    if rng.is_file():  # a rank the saving run did not have keeps its fresh generators
        _set_rng_state(torch.load(rng, weights_only=False))


def parameter_keys(model: nn.Module) -> list[tuple[str, str]]:
    """(Hugging Face name, checkpoint key) of each parameter, in the live export's order."""
    prefix = "causal_lm." if hasattr(model, "causal_lm") else ""
    hf_model = model.causal_lm if prefix else model
    return [(clean_name(n), prefix + clean_name(n)) for n, _ in hf_model.named_parameters()]


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fsdp.checkpoint", description="Export a DCP checkpoint to a Hugging Face folder."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="checkpoint folder -> Hugging Face folder (one CPU process)")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path)
    export.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    export.add_argument("--max-shard-mb", type=int, default=2000)
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
