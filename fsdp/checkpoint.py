"""Checkpoints: sharded (DCP), verified, resumable at any world size; the Checkpointer decides when.

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
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from durable import fsync_dir, fsync_file, write_atomic, write_json
from fsdp import faults
from fsdp.activation import clean_name
from fsdp.dist import from_every_rank, from_main, print0
from fsdp.metrics import MetricsLogger

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
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's own GPU only: a resume may see fewer GPUs (one per process, say) than this run.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if isinstance(state.get("cuda"), torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # onto this rank's current device


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict,
    is_main: bool,
    keep_last: int | None = None,
    hf_files: Callable[[Path], None] | None = None,
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
    write_atomic(tmp / f"rank-{rank}.pt", partial(torch.save, _rng_state()))
    if is_main:
        meta = {**meta, "step": step, "world_size": dist.get_world_size(), "parameters": keys}
        write_json(tmp / "meta.json", meta)
        if hf_files is not None:
            hf_files(tmp / "hf")
    faults.point("save")

    # Each rank checksums what it wrote and fsyncs it: the marker, written by rank 0 once every
    # rank is done, must never promise bytes a power cut could still take; the rename publishes it.
    mine = [f for f in tmp.iterdir() if f.name.startswith((f"__{rank}_", f"rank-{rank}."))]
    if is_main:
        # Not the others' files, nor their writes in flight (".rank-R.pt.tmp-...", renamed any moment).
        mine += [f for f in tmp.iterdir() if f.is_file() and not f.name.startswith(("__", "rank-", "."))]
        mine += [f for f in (tmp / "hf").rglob("*") if f.is_file()] if (tmp / "hf").is_dir() else []
    sums = {str(f.relative_to(tmp)): [f.stat().st_size, _crc32(f)] for f in mine}
    for f in mine:
        fsync_file(f)
    for folder in {tmp} | {f.parent for f in mine}:
        fsync_dir(folder)
    everyone = from_every_rank(sums)
    total = 0
    if is_main:
        files = {k: v for part in everyone for k, v in part.items()}
        total = sum(size for size, _ in files.values())
        write_json(tmp / MARKER, {"step": step, "files": files})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
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

    Every rank calls it. Rank 0 lists the candidates and reads their meta, and every rank takes
    its word (a rank with a stale directory listing must not resume elsewhere: the ranks would run
    different collectives and hang); the ranks verify each candidate's files together.
    `auto` with no checkpoint yet is a fresh start; a named path that does not verify is an error;
    `auto` passes over a damaged checkpoint to the previous complete one, and says so.
    """
    if resume is None:
        return None, None, []
    distributed = dist.is_initialized()
    if resume == "auto":
        candidates = list(reversed(complete_checkpoints(run_dir)))
    else:
        candidates = [Path(resume)] if Path(resume).is_dir() else []
    if distributed:
        candidates = from_main(candidates)
    if resume != "auto" and not candidates:
        raise CheckpointError(f"resume={resume}: no such checkpoint folder")
    share = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    warnings = []
    for path in candidates:
        error, meta = None, None
        try:
            meta = verify_checkpoint(path, share)
        except CheckpointError as err:
            error = str(err)
        errors = from_every_rank(error) if distributed else [error]
        first = next((e for e in errors if e), None)
        if first is None:
            return path, from_main(meta) if distributed else meta, warnings
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


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict | None) -> None: ...


@dataclass(frozen=True)
class CheckpointSettings:
    every_steps: int | None = None  # a checkpoint every N optimizer steps
    at_end: bool = True  # and one after the last
    keep_last: int | None = 2  # older complete checkpoints are deleted; None keeps all


class Checkpointer:
    """Decides when the run saves, saves everything a resume needs, and restores it.

    Besides the model and AdamW state, a checkpoint carries the run's other `parts` (the data
    loader's position, the evaluator's history and answers): anything with state_dict() and
    load_state_dict(), stored in meta.json under its name. `meta` (the resolved config and what a
    resume must not change) goes in as it is; `hf_files(folder)` writes the model's config and
    tokenizer beside the shards, so a checkpoint exports without the original model folder.
    """

    def __init__(
        self,
        run_dir: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        parts: dict[str, Stateful],
        meta: dict,
        settings: CheckpointSettings,
        is_main: bool,
        hf_files: Callable[[Path], None] | None = None,
        metrics: MetricsLogger | None = None,
    ):
        self.run_dir = run_dir
        self.model, self.optimizer = model, optimizer
        self.parts, self.meta = parts, meta
        self.settings, self.is_main = settings, is_main
        self.hf_files, self.metrics = hf_files, metrics

    def restore(self, path: Path | None, meta: dict | None) -> int:
        """Load checkpoint `path` (DCP reshards it to this world size); the step to continue from."""
        if path is None:
            return 0
        start = time.perf_counter()
        load_checkpoint(path, self.model, self.optimizer)
        for name, part in self.parts.items():
            part.load_state_dict(meta.get(name))
        print0(
            f"resumed from {path} (step {meta['step']}, saved by {meta['world_size']} ranks) "
            f"in {time.perf_counter() - start:.1f} s"
        )
        return meta["step"]

    def save_if_due(self, step: int, last_step: int) -> None:
        """Save after `step` optimizer steps if it is a checkpoint step (every N, or the last)."""
        every = self.settings.every_steps
        if not ((every and step % every == 0) or (step == last_step and self.settings.at_end)):
            return
        meta = {**self.meta, **{name: part.state_dict() for name, part in self.parts.items()}}
        report = save_checkpoint(
            self.run_dir,
            step,
            self.model,
            self.optimizer,
            meta,
            self.is_main,
            self.settings.keep_last,
            self.hf_files,
        )
        if self.metrics is not None:
            self.metrics.log_extra(
                step, {"checkpoint/save_s": report["seconds"], "checkpoint/bytes": report["bytes"]}
            )
            self.metrics.write(
                f"checkpoint {report['path']}: {report['bytes'] / 2**20:,.1f} MiB in {report['seconds']:.1f} s"
            )

    def last_good(self) -> str:
        latest = complete_checkpoints(self.run_dir)
        return str(latest[-1]) if latest else "none yet"
