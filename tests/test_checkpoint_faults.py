"""Checkpoints under faults, cheaply: folders made by hand, saves driven in process on a process
group of one rank (gloo), and one spawn of 2 ranks where only rank 1's disk is full.

A full disk is injected (OSError ENOSPC from a writer); crafted pickles stand for files someone
else wrote into a checkpoint or the shared tokenized cache.
"""

from __future__ import annotations

import errno
import json
import os
import re
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fsdp.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointSettings,
    SaveFailed,
    remove_other_timeline,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
from tests.helpers import run_distributed

TINY = ["preset=tiny", "precision=fp32"]


class Payload:
    """Unpickled, it makes a folder: the proof that a load ran code from the file."""

    def __init__(self, proof: Path):
        self.proof = str(proof)

    def __reduce__(self):
        return (os.mkdir, (self.proof,))


def fake_checkpoint(run_dir: Path, step: int, meta: dict | None = None) -> Path:
    """A checkpoint folder as a save publishes it: a shard, .metadata, meta.json and the marker."""
    folder = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(bytes(range(256)) * 4)
    (folder / ".metadata").write_bytes(b"dcp metadata")
    (folder / "meta.json").write_text(json.dumps({"step": step, **(meta or {})}))
    files = {
        f.name: [f.stat().st_size, zlib.crc32(f.read_bytes())]
        for f in sorted(folder.iterdir())
        if f.is_file()
    }
    (folder / "COMPLETE.json").write_text(json.dumps({"step": step, "files": files}))
    return folder


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def resume_config(run_dir: Path, *args: str):
    from config import load_config

    return load_config([*TINY, f"run_dir={run_dir}", *args])


def fingerprint(run_dir: Path) -> dict:
    from config import resume_fingerprint

    return {"fingerprint": resume_fingerprint(resume_config(run_dir), 1)}


# 1. resume=auto never starts afresh over checkpoints it could not verify.


@pytest.mark.fast
def test_auto_stops_naming_every_damaged_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    shards = [fake_checkpoint(run_dir, step) / "__0_0.distcp" for step in (2, 4)]
    for shard in shards:
        flip_a_byte(shard)
    with pytest.raises(CheckpointError) as stopped:
        resolve_resume(run_dir, "auto")
    line = str(stopped.value)
    assert "\n" not in line
    assert line.startswith(f"resume=auto: none of the 2 checkpoint(s) in {run_dir / 'checkpoints'} can be")
    for shard in shards:
        assert f"{shard}: contents do not match the marker's CRC-32: corrupted" in line
    assert all(shard.is_file() for shard in shards)  # nothing removed
    # A published folder whose marker is gone is a damaged checkpoint too, not a fresh start.
    (shards[1].parent / "COMPLETE.json").unlink()
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint"):
        resolve_resume(run_dir, "auto")


def test_make_train_resume_auto_keeps_damaged_checkpoints(tmp_path):
    """`make train ARGS=resume=auto` passes overwrite=true: it once cleared the run folder here."""
    from tests.helpers import run

    run_dir = tmp_path / "run"
    shard = fake_checkpoint(run_dir, 3, fingerprint(run_dir)) / "__0_0.distcp"
    flip_a_byte(shard)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    result = run([*TINY, f"run_dir={run_dir}", "overwrite=true", "resume=auto"], nproc=None)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "checkpoint error: resume=auto: none of the 1 checkpoint(s)" in result.stderr
    assert f"{shard}: contents do not match" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


# 2. One run_dir, one line of checkpoints.


@pytest.mark.fast
def test_an_explicit_older_checkpoint_is_refused_or_replaces_the_newer_ones(tmp_path):
    from config import ConfigError
    from config.validate import validate_resume

    run_dir = tmp_path / "run"
    meta = fingerprint(run_dir)
    for step in (1, 2, 3, 4):
        fake_checkpoint(run_dir, step, meta)
    (run_dir / "summary.json").write_text(json.dumps({"steps": 4}))
    older = run_dir / "checkpoints" / "step-00000002"

    with pytest.raises(ConfigError) as refused:
        validate_resume(resume_config(run_dir, f"resume={older}"), 1)
    assert str(refused.value).startswith(
        f"resume.path={older} (step 2): run_dir={run_dir} holds checkpoints of another timeline "
        "(step-00000003, step-00000004)"
    )
    validate_resume(resume_config(run_dir, f"resume={older}", "overwrite=true"), 1)
    validate_resume(resume_config(run_dir, f"resume={run_dir / 'checkpoints' / 'step-00000004'}"), 1)

    assert remove_other_timeline(run_dir, older, 2) == ["step-00000003", "step-00000004", "summary.json"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    # From another run_dir: fine into an empty one, refused into one that holds checkpoints.
    elsewhere = fake_checkpoint(tmp_path / "other", 5, meta)
    validate_resume(resume_config(tmp_path / "fresh", f"resume={elsewhere}"), 1)
    with pytest.raises(ConfigError, match=r"another timeline \(step-00000001, step-00000002\)"):
        validate_resume(resume_config(run_dir, f"resume={elsewhere}"), 1)


# 3. A damaged meta.json: one line, or the previous checkpoint.


@pytest.mark.fast
def test_a_damaged_meta_json_is_one_line_or_the_previous_checkpoint(tmp_path):
    from config import ConfigError
    from config.validate import validate_resume

    run_dir = tmp_path / "run"
    meta = fingerprint(run_dir)
    fake_checkpoint(run_dir, 1, meta)
    newest = fake_checkpoint(run_dir, 2, meta)
    (newest / "meta.json").write_text('{"step": 2, "fingerp')  # torn

    # Of 2 ranks, the one that does not checksum meta.json still reads it.
    for share in ((0, 2), (1, 2)):
        with pytest.raises(CheckpointError, match=re.escape(f"{newest / 'meta.json'}: ")):
            verify_checkpoint(newest, share)
    validate_resume(resume_config(run_dir, "resume=auto"), 1)  # checks step 1's instead
    resumed = resolve_resume(run_dir, "auto")
    assert resumed.folder == run_dir / "checkpoints" / "step-00000001" and resumed.step == 1
    warnings = resumed.warnings
    assert len(warnings) == 1 and warnings[0].startswith(
        f"skipping a damaged checkpoint: {newest / 'meta.json'}: "
    )
    with pytest.raises(
        ConfigError, match=re.escape(f"resume.path={newest}: {newest / 'meta.json'}: unreadable (")
    ):
        validate_resume(resume_config(run_dir, f"resume={newest}", "overwrite=true"), 1)


# 5. Nothing read from a checkpoint or the tokenized cache runs code.


@pytest.mark.fast
def test_a_crafted_tokenized_cache_is_refused_and_not_run(tmp_path):
    from data.dataset import cached, open_parts
    from data.tokens import TokenArrays

    key = {"version": 2, "data": "x"}

    def compute(folder):
        written = TokenArrays.from_examples([{"input_ids": [1, 2], "labels": [2, 3]}]).write(
            folder, "domain-train"
        )
        return {"parts": {"domain/train": {**written, "file": "domain-train"}}}

    folder, meta, hit = cached(key, str(tmp_path), compute)
    assert not hit and open_parts(folder, meta)["domain/train"].example(0) == {
        "input_ids": [1, 2],
        "labels": [2, 3],
    }
    assert cached(key, str(tmp_path), lambda _: pytest.fail("recomputed"))[2] is True

    # A pickle in place of the token ids is only ever bytes to map: never run, refused by its size.
    proof = tmp_path / "ran"
    torch.save({"domain/train": Payload(proof)}, folder / "domain-train.tokens")
    with pytest.raises(ValueError) as refused:
        open_parts(folder, meta)
    assert not proof.exists()
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"{folder}: refused, not a tokenized cache this code wrote (")
    assert "domain-train.tokens" in line
    # A meta.json of another key (or version) under this key's name: refused, not trusted.
    (folder / "meta.json").write_text(json.dumps({**meta, "key": {"other": 1}}))
    with pytest.raises(
        ValueError,
        match=r"refused, not a tokenized cache this code wrote \(its meta.json is for another key\)",
    ):
        cached(key, str(tmp_path), lambda _: pytest.fail("recomputed"))


# Saves and restores in this process, on a process group of one rank.


@pytest.fixture(scope="module")
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def model_and_adamw(weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8):
    from fsdp.adamw import init_state, make_adamw, param_groups

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.LayerNorm(512))
    optimizer = make_adamw(param_groups(model, weight_decay), lr=1e-3, betas=betas, eps=eps)
    init_state(optimizer)
    return model, optimizer


def checkpointer(run_dir: Path, model, optimizer, keep_last: int | None = None, is_main: bool = True):
    return Checkpointer(
        run_dir,
        model,
        optimizer,
        parts={},
        meta={},
        settings=CheckpointSettings(every_steps=1, at_end=True, keep_last=keep_last),
        is_main=is_main,
    )


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def short_write(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize(
    ("target", "fault", "said"),
    [
        ("torch.distributed.checkpoint.filesystem._write_item", enospc, "No space left on device"),
        ("fsdp.checkpoint.write_atomic", short_write, "unexpected pos 704 vs 598 (a short write: the disk"),
    ],
)
def test_a_full_disk_while_saving_is_one_line(one_rank, tmp_path, monkeypatch, target, fault, said):
    run_dir = tmp_path / "run"
    saver = checkpointer(run_dir, *model_and_adamw())
    saver.save_if_due(1, 3)
    monkeypatch.setattr(target, fault)
    with pytest.raises(SaveFailed) as failed:
        saver.save_if_due(2, 3)
    line, root = str(failed.value), run_dir / "checkpoints"
    assert "\n" not in line and line.startswith(f"checkpoint error: saving step 2 in {root} failed: rank 0: ")
    assert said in line
    # 512 x 512 + 3 x 512 parameters, and AdamW's two moments of each, in fp32: 3.02 MiB.
    assert (
        "; it needs about 3.0 MiB, " in line
        and " MiB are free there; its partial folder was removed; " in line
    )
    assert line.endswith(f"resume=auto will resume from {root / 'step-00000001'}")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    verify_checkpoint(root / "step-00000001")


def test_the_marker_covers_dcp_metadata_and_keep_last_keeps_the_new_checkpoint(one_rank, tmp_path):
    run_dir = tmp_path / "run"
    model, optimizer = model_and_adamw()
    later = fake_checkpoint(run_dir, 9)  # of another timeline
    saved = save_checkpoint(run_dir, 1, model, optimizer, meta={}, is_main=True, keep_last=1)
    saved = Path(save_checkpoint(run_dir, 2, model, optimizer, meta={}, is_main=True, keep_last=1)["path"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002", "step-00000009"]
    assert later.is_dir()
    marker = json.loads((saved / "COMPLETE.json").read_text())["files"]
    assert {".metadata", "meta.json", "rank-0.pt"} <= set(marker)
    flip_a_byte(saved / ".metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata: contents do not match the marker's CRC-32"):
        verify_checkpoint(saved)


def test_leftovers_of_failed_saves_are_removed_at_the_next_start(one_rank, tmp_path, capsys):
    root = tmp_path / "run" / "checkpoints"
    for name in ("step-00000004.tmp", "step-00000002.deleting", "notes.tmp", "step-4.tmp"):
        (root / name).mkdir(parents=True)
    checkpointer(tmp_path / "run", *model_and_adamw())
    assert sorted(p.name for p in root.iterdir()) == ["notes.tmp", "step-4.tmp"]
    assert "removed step-00000002.deleting, step-00000004.tmp in" in capsys.readouterr().out


def test_a_resume_keeps_the_configured_optimizer_settings(one_rank, tmp_path, capsys):
    run_dir = tmp_path / "run"
    checkpointer(run_dir, *model_and_adamw(0.1, (0.9, 0.95), 1e-8)).save_if_due(1, 1)
    path = run_dir / "checkpoints" / "step-00000001"
    model, optimizer = model_and_adamw(0.0, (0.9, 0.99), 1e-6)
    assert checkpointer(run_dir, model, optimizer).restore(path, {"step": 1, "world_size": 1}) == 1
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.0, 0.0)
    assert all(tuple(g["betas"]) == (0.9, 0.99) and g["eps"] == 1e-6 for g in optimizer.param_groups)
    said = capsys.readouterr().out
    assert "resume: optim.weight_decay 0.1 -> 0.0 (the config's value is used)\n" in said
    assert "resume: optim.betas (0.9, 0.95) -> (0.9, 0.99) (the config's value is used)\n" in said
    assert "resume: optim.eps 1e-08 -> 1e-06 (the config's value is used)\n" in said
    checkpointer(run_dir, *model_and_adamw(0.1, (0.9, 0.95), 1e-8)).restore(
        path, {"step": 1, "world_size": 1}
    )
    assert "resume: optim" not in capsys.readouterr().out  # nothing changed, nothing said


def test_a_crafted_rank_file_in_a_checkpoint_is_refused_and_not_run(one_rank, tmp_path):
    run_dir = tmp_path / "run"
    checkpointer(run_dir, *model_and_adamw()).save_if_due(1, 1)
    path = run_dir / "checkpoints" / "step-00000001"
    proof = tmp_path / "ran"
    torch.save({"torch": Payload(proof)}, path / "rank-0.pt")
    with pytest.raises(CheckpointError) as refused:
        checkpointer(run_dir, *model_and_adamw()).restore(path, {"step": 1, "world_size": 1})
    assert not proof.exists()
    line = str(refused.value)
    assert "\n" not in line and line.startswith(
        f"{path / 'rank-0.pt'}: refused: not plain saved generator state"
    )


# 4, at 2 ranks: only rank 1's disk is full, and both ranks stop with the same line.


def _rank_1_disk_full(d, run_dir: str) -> str:
    import fsdp.checkpoint

    saver = checkpointer(Path(run_dir), *model_and_adamw(), is_main=d.is_main)
    saver.save_if_due(1, 3)
    if d.rank == 1:
        fsdp.checkpoint.write_atomic = enospc
    try:
        saver.save_if_due(2, 3)
    except SaveFailed as err:
        return str(err)
    return "saved"


def test_a_full_disk_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    said = run_distributed(_rank_1_disk_full, 2, str(run_dir), timeout=120)
    root = run_dir / "checkpoints"
    assert said[0] == said[1]
    assert said[0].startswith(f"checkpoint error: saving step 2 in {root} failed: rank 1: [Errno 28] ")
    assert said[0].endswith(f"resume=auto will resume from {root / 'step-00000001'}")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
