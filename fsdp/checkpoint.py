"""Checkpoints: sharded (DCP), verified, resumable at any world size; the Checkpointer decides when.

A checkpoint is a folder `run_dir/checkpoints/step-NNNNNNNN/`:
  __R_0.distcp, .metadata   model and AdamW state, written by DCP: each rank writes only its shards,
                            and any number of ranks can read them back (DCP reshards on load)
  rank-R.pt                 rank R's random number generators (torch, CUDA, Python, numpy)
  meta.json                 step, data-loader position, world size, the resolved config, the model's
                            config.json and what must not change across a resume
  hf/                       the model's config and tokenizer, so the checkpoint exports on its own
  COMPLETE.json             the marker: every file's size and CRC-32 (.metadata and meta.json
                            included), written last
It is written as `step-NNNNNNNN.tmp/` and renamed once every rank has finished and the marker is
on disk, so a folder without `.tmp` and with a marker that matches its files is complete. Older
checkpoints are deleted (`keep_last`) only after the new one is complete, renamed `.deleting`
first: a kill at any instant leaves the latest complete checkpoint as it was.

A save that fails on any rank (a full disk) fails on every rank at once, as one SaveFailed line;
its `.tmp` folder is removed then, or at the next start if the run was killed. A run_dir holds one
line of checkpoints: a resume from an older checkpoint than its newest is refused, or, with
overwrite=true, the newer ones (another timeline) are removed first (`other_timeline`).
"""

from __future__ import annotations

import json
import os
import random
import re
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

from durable import RefusedFile, fsync_dir, fsync_file, read_torch_file, write_atomic, write_json
from fsdp import faults
from fsdp.activation import clean_name
from fsdp.dist import from_every_rank, from_main, print0
from fsdp.metrics import MetricsLogger

MARKER = "COMPLETE.json"
# What a save leaves behind when it dies: its folder in the making, or an old checkpoint being deleted.
LEFTOVER = re.compile(r"step-\d{8}\.(tmp|deleting)")
# The optimizer's settings of a parameter group, as the config names them (lr is set every step).
HYPERPARAMETERS = {"weight_decay": "optim.weight_decay", "betas": "optim.betas", "eps": "optim.eps"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder or file and why."""


class SaveFailed(RuntimeError):
    """A save that failed on some rank (a full disk, say), raised on every rank together; the
    message is one line: the folder, the bytes the save needed and those free, and the checkpoint
    a resume will use."""


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Published checkpoint folders (`step-NNNNNNNN`, neither `.tmp` nor `.deleting`), oldest first.

    A save renames its folder only once the marker is on disk, so one of these without a marker is
    a damaged checkpoint, not a save that died."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.name.removeprefix("step-").isdigit() and p.is_dir()]
    return sorted(found, key=step_of)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders that carry a marker, oldest first (files are verified on load)."""
    return [p for p in checkpoint_folders(run_dir) if (p / MARKER).is_file()]


def other_timeline(run_dir: Path, resume_from: Path, step: int) -> list[Path]:
    """The checkpoints of run_dir that a resume from `resume_from` (at `step`) does not lead to:
    those after its step when it lies in run_dir, all of them when it lies elsewhere.

    Left beside the resumed run's own, resume=auto could later pick one of them, a finished run's
    summary could vouch for the wrong model, and keep_last would sort the two runs together."""
    found = checkpoint_folders(run_dir)
    if Path(resume_from).resolve().parent == checkpoints_dir(run_dir).resolve():
        return [p for p in found if step_of(p) > step]
    return found


def remove_other_timeline(run_dir: Path, resume_from: Path, step: int) -> list[str]:
    """overwrite=true with resume.path (rank 0, before the first save): remove `other_timeline`'s
    checkpoints and the summary.json that marked that timeline finished, and say so in one line."""
    doomed = other_timeline(run_dir, resume_from, step)
    for old in doomed:
        delete_checkpoint(old)
    removed = [p.name for p in doomed]
    summary = Path(run_dir) / "summary.json"
    if doomed and summary.is_file():
        summary.unlink()
        removed.append(summary.name)
    if removed:
        print(
            f"overwrite=true: resuming from {resume_from} (step {step}), removed what run_dir={run_dir} "
            f"held of another timeline: {', '.join(removed)}",
            flush=True,
        )
    return removed


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
    *,
    meta: dict,
    is_main: bool,
    keep_last: int | None = None,
    hf_files: Callable[[Path], None] | None = None,
) -> dict:
    """Write checkpoint `step` (every rank calls this). Returns its path, seconds and bytes.

    `meta` (JSON) is written by rank 0; `hf_files(folder)` writes the model's config and
    tokenizer there (rank 0), so the checkpoint exports without the original model folder.
    A write that fails on any rank (OSError, torch's short write) raises SaveFailed on every rank,
    after the ranks have agreed on it and the partial folder is removed: none waits for ever in a
    collective the failed rank never joins.
    """
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    start = time.perf_counter()
    rank = dist.get_rank()
    final = checkpoints_dir(run_dir) / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")

    model_state, optimizer_state = get_state_dict(model, optimizer)
    keys = parameter_keys(model)
    missing = [key for _, key in keys if key not in model_state]
    if missing:  # the offline export reads these keys: a naming change must not pass silently
        raise CheckpointError(f"model state lacks {missing[:3]}: parameter names and state keys disagree")
    needed = _tensor_bytes(model_state) + _tensor_bytes(optimizer_state)

    error = None
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died before, at this step
        try:
            tmp.mkdir(parents=True)
        except OSError as err:
            error = f"rank {rank}: {_write_failure(err)}"
    error = from_main(error)  # also the barrier: no rank writes before the folder exists

    sums = {}
    if error is None:
        try:
            sums = _write_shards(
                tmp,
                model_state,
                optimizer_state,
                rank=rank,
                meta=meta,
                keys=keys,
                step=step,
                is_main=is_main,
                hf_files=hf_files,
            )
        except BaseException as err:
            reason = _write_failure(err)
            if reason is None:
                raise  # not a failed write: a bug, with its traceback
            # DCP gathers every rank's failure and raises the same exception on all: it names the rank.
            error = reason if isinstance(err, CheckpointException) else f"rank {rank}: {reason}"
    everyone = from_every_rank((sums, error))
    failures = list(dict.fromkeys(e for _, e in everyone if e))
    total, message = 0, None
    if is_main:
        if not failures:
            files = {k: v for part, _ in everyone for k, v in part.items()}
            total = sum(size for size, _ in files.values())
            try:
                write_json(tmp / MARKER, {"step": step, "files": files})
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                fsync_dir(final.parent)
            except (OSError, RuntimeError) as err:
                failures = [f"rank {rank}: {_write_failure(err)}"]
        if failures:
            shutil.rmtree(tmp, ignore_errors=True)
            message = _save_failed_line(run_dir, step, failures, needed)
        else:
            _prune(run_dir, step, keep_last)
    message = from_main(message)  # every rank learns the outcome, and none goes on before rank 0
    if message is not None:
        raise SaveFailed(message)
    return {"path": str(final), "seconds": time.perf_counter() - start, "bytes": total}


def _write_shards(
    tmp: Path,
    model_state: dict,
    optimizer_state: dict,
    *,
    rank: int,
    meta: dict,
    keys: list[tuple[str, str]],
    step: int,
    is_main: bool,
    hf_files: Callable[[Path], None] | None,
) -> dict[str, list[int]]:
    """This rank's files of the checkpoint in `tmp`, written and fsynced; returns their sizes and CRCs."""
    import torch.distributed.checkpoint as dcp

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
        # Not the others' files, nor their writes in flight (".rank-R.pt.tmp-...", renamed any
        # moment); DCP's .metadata is rank 0's, and a resume cannot read the shards without it.
        mine += [
            f
            for f in tmp.iterdir()
            if f.is_file() and (f.name == ".metadata" or not f.name.startswith(("__", "rank-", ".")))
        ]
        mine += [f for f in (tmp / "hf").rglob("*") if f.is_file()] if (tmp / "hf").is_dir() else []
    sums = {str(f.relative_to(tmp)): [f.stat().st_size, _crc32(f)] for f in mine}
    for f in mine:
        fsync_file(f)
    for folder in {tmp} | {f.parent for f in mine}:
        fsync_dir(folder)
    return sums


def _prune(run_dir: Path, step: int, keep_last: int | None) -> None:
    """keep_last: delete the oldest checkpoints before `step`, just written, which is always kept.

    Only those before it: a later one belongs to another timeline (see `other_timeline`), and
    sorting it in would delete the checkpoint just written."""
    if keep_last:
        before = [p for p in complete_checkpoints(run_dir) if step_of(p) < step]
        for old in before[: max(0, len(before) - (keep_last - 1))]:
            delete_checkpoint(old)


def delete_checkpoint(folder: Path) -> None:
    """Remove a checkpoint folder, renamed `.deleting` first: from that instant it is no longer a
    checkpoint, so a kill midway leaves no half of one for resume=auto to find (the next start
    removes the `.deleting` folder: remove_failed_saves)."""
    doomed = folder.with_name(folder.name + ".deleting")
    os.replace(folder, doomed)
    faults.point("delete")
    shutil.rmtree(doomed)


def _tensor_bytes(state: object) -> int:
    """The bytes of every tensor in a (nested) state dict, at their full size for sharded ones."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()  # a DTensor's numel is the whole tensor's
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_tensor_bytes(v) for v in state)
    return 0


def _write_failure(err: BaseException) -> str | None:
    """One line for a write that failed (a full disk, an I/O error, torch's short write), or None
    if `err` is something else. DCP wraps each rank's exception and names the rank."""
    from torch.distributed.checkpoint import CheckpointException

    if isinstance(err, CheckpointException):
        reasons = [(rank, _write_failure(e)) for rank, (e, _) in sorted(err.failures.items())]
        if not reasons or any(reason is None for _, reason in reasons):
            return None
        ranks_by_reason: dict[str, list[int]] = {}
        for rank, reason in reasons:  # a full disk fails every rank alike: said once, for all of them
            ranks_by_reason.setdefault(reason, []).append(rank)
        return "; ".join(
            f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {reason}"
            for reason, ranks in ranks_by_reason.items()
        )
    if isinstance(err, OSError):
        return str(err)
    if isinstance(err, RuntimeError):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"{first} (a short write: the disk is full, or failing)"
    return None


def _save_failed_line(run_dir: Path, step: int, failures: list[str], needed: int) -> str:
    folder = checkpoints_dir(run_dir)
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB are free there"
    except OSError as err:
        free = f"the free space is unknown ({err.strerror})"
    latest = complete_checkpoints(run_dir)
    resume = (
        f"resume=auto will resume from {latest[-1]}"
        if latest
        else "there is no complete checkpoint: resume=auto would start afresh"
    )
    return (
        f"checkpoint error: saving step {step} in {folder} failed: {'; '.join(failures)}; it needs "
        f"about {needed / 2**20:,.1f} MiB, {free}; its partial folder was removed; {resume}"
    )


def remove_failed_saves(run_dir: Path) -> list[str]:
    """The folders of saves that died (step-N.tmp, step-N.deleting) by name: removed at the start of
    the next run, which holds the run folder's lock, so no save of another run is in flight."""
    root = checkpoints_dir(run_dir)
    leftovers = sorted(p for p in root.iterdir() if LEFTOVER.fullmatch(p.name)) if root.is_dir() else []
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    if leftovers:
        names = ", ".join(p.name for p in leftovers)
        print(f"checkpoints: removed {names} in {root}, left by a save that failed or was killed", flush=True)
    return [p.name for p in leftovers]


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
        entries = {str(name): (int(size), int(crc)) for name, (size, crc) in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{marker}: unreadable marker ({type(err).__name__}: {err})") from None
    mine = sorted(entries)[share[0] :: share[1]]
    for name, (size, crc) in ((n, entries[n]) for n in mine):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{f}: {f.stat().st_size} bytes, the marker says {size}: truncated or rewritten"
            )
        if _crc32(f) != crc:
            raise CheckpointError(f"{f}: contents do not match the marker's CRC-32: corrupted")
    return read_meta(path)


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json, or a CheckpointError naming it. Every rank reads it, while only one
    checks its CRC: a damaged one must fail as one line on each, not as a traceback on some."""
    f = Path(path) / "meta.json"
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{f}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{f}: not a checkpoint's meta.json (no step)")
    return meta


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: a verified checkpoint and its meta.json, or neither (a fresh start);
    `warnings`: the damaged checkpoints passed over on the way, one line each."""

    folder: Path | None = None
    meta: dict | None = None
    warnings: tuple[str, ...] = ()

    @property
    def step(self) -> int:
        """The last step the checkpoint completed; 0 for a fresh start."""
        return self.meta["step"] if self.meta else 0


def resolve_resume(run_dir: Path, resume: str | None) -> ResumePoint:
    """The checkpoint to resume from, and the warnings on the way. `auto`: the latest that verifies.

    Every rank calls it. Rank 0 lists the candidates and reads their meta, and every rank takes
    its word (a rank with a stale directory listing must not resume elsewhere: the ranks would run
    different collectives and hang); the ranks verify each candidate's files together.
    `auto` with no checkpoint yet is a fresh start; a named path that does not verify is an error;
    `auto` passes over a damaged checkpoint to the previous complete one, and says so. If every one
    is damaged, it stops, naming each and why: starting afresh (and with overwrite=true, clearing
    run_dir) over checkpoints that someone may repair is the user's decision.
    """
    if resume is None:
        return ResumePoint()
    distributed = dist.is_initialized()
    if resume == "auto":
        candidates = list(reversed(checkpoint_folders(run_dir)))
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
            return ResumePoint(path, from_main(meta) if distributed else meta, tuple(warnings))
        if resume != "auto":
            raise CheckpointError(first)
        warnings.append(f"skipping a damaged checkpoint: {first}")
    if candidates:
        reasons = "; ".join(w.removeprefix("skipping a damaged checkpoint: ") for w in warnings)
        raise CheckpointError(
            f"resume=auto: none of the {len(candidates)} checkpoint(s) in {checkpoints_dir(run_dir)} can "
            f"be resumed from, nothing was changed: {reasons}. Repair or remove them, or start afresh "
            "without resume=auto"
        )
    return ResumePoint(warnings=tuple(warnings))


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
        _set_rng_state(load_rng_file(rng))


def load_rng_file(path: Path) -> dict:
    """A rank's generators, read without running any code from the file: tensors, numbers and
    numpy's state array only (whoever can write a checkpoint folder must not run code in the job)."""
    import numpy as np

    # What rebuilds numpy's uint32 state array, and nothing else (its module differs by numpy version).
    reconstruct = np.zeros(1).__reduce__()[0]
    numpy_array = [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        return read_torch_file(path, numpy_array)
    except RefusedFile as err:
        raise CheckpointError(f"{path}: refused: not plain saved generator state ({err.cause})") from None


def parameter_keys(model: nn.Module) -> list[tuple[str, str]]:
    """(Hugging Face name, checkpoint key) of each parameter, in the live export's order."""
    prefix = "causal_lm." if hasattr(model, "causal_lm") else ""
    hf_model = model.causal_lm if prefix else model
    return [(clean_name(n), prefix + clean_name(n)) for n, _ in hf_model.named_parameters()]


def reapply_hyperparameters(optimizer: torch.optim.Optimizer, configured: list[dict]) -> list[str]:
    """Set each param group's settings (HYPERPARAMETERS) back to `configured` (the groups as the
    config made them); returns one line per setting the checkpoint had otherwise."""
    changes = {}
    for group, wanted in zip(optimizer.param_groups, configured, strict=True):
        for key, name in HYPERPARAMETERS.items():
            if key not in wanted:
                continue
            saved, value = group.get(key), wanted[key]
            if _plain(saved) != _plain(value):
                changes.setdefault(name, (saved, value))
            group[key] = value
    return [
        f"{name} {_plain(saved)} -> {_plain(value)} (the config's value is used)"
        for name, (saved, value) in changes.items()
    ]


def _plain(value: object) -> object:
    """betas come back from a checkpoint as a list or a tensor pair; compared and shown as numbers."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


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
        *,
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
        if is_main:
            remove_failed_saves(run_dir)

    def restore(self, path: Path | None, meta: dict | None) -> int:
        """Load checkpoint `path` (DCP reshards it to this world size); the step to continue from.

        The optimizer's settings stay the config's: loading AdamW's state also loads the saved
        param groups' weight decay, betas and eps, which are put back, and each change is said."""
        if path is None:
            return 0
        start = time.perf_counter()
        configured = [dict(group) for group in self.optimizer.param_groups]
        load_checkpoint(path, self.model, self.optimizer)
        for line in reapply_hyperparameters(self.optimizer, configured):
            print0(f"resume: {line}")
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
            meta=meta,
            is_main=self.is_main,
            keep_last=self.settings.keep_last,
            hf_files=self.hf_files,
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
