"""Files that survive a kill at any byte: the only way anything here writes a file.

A run can be killed at any instant (a node dies, a launcher is stopped, an OOM killer picks a
rank), and a resume reads what the killed attempt left. Two shapes of file survive that:

- a file that is written whole (a report, a config, a checkpoint's metadata, a cache) goes
  through `write_atomic`: written to a temporary name beside it, flushed, fsynced, renamed over
  the old one, and the folder fsynced. A reader sees the old file or the new one, never a mix.
  A folder that is written whole (an exported model) is filled under a temporary name and
  published by `publish_folder`, which fsyncs every file first.
- a log that grows (metrics.jsonl) is an `AppendLog`: one JSON row per line, appended and
  flushed row by row, never rewritten in place. A kill can tear only its last row; the next
  writer ends that row's line first, and `read_jsonl` skips a torn row with one warning.

What torch.save wrote is read back by `read_torch_file`, which unpickles tensors, numbers and
containers only: a checkpoint folder or a shared cache may hold a file someone else put there.

fsdp/, data/ and the programs all write through here; a test holds the code to it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path

Content = str | bytes | Callable[[Path], None]


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (files created, renamed, removed in it) durable."""
    if sys.platform != "win32":  # Windows cannot open a folder; its renames are durable enough
        fsync_file(path)


def write_atomic(path: Path, content: Content) -> None:
    """Replace `path` whole: the old file or the new one survives a kill, never a torn mix.

    `content`: text (UTF-8), bytes, or a function that writes the new file at the path it is
    given (torch.save, safetensors, matplotlib), for writers that want a path of their own.
    """
    path = Path(path)
    # Host and pid: two nodes may write one file of a shared folder at once (a shared cache).
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json(path: Path, value: object, indent: int | None = 1) -> None:
    write_atomic(path, json.dumps(value, indent=indent, ensure_ascii=False))


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, deepest first, the folder itself last."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def publish_folder(tmp: Path, final: Path) -> None:
    """Make the folder written at `tmp` appear as `final`, whole: its files are fsynced first.

    An older `final` is renamed aside before the new one takes its name and removed after, so a
    kill leaves the old folder, or a complete `tmp` beside no `final`, or the new one; never a mix.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


class AppendLog:
    """A JSON-lines file that only grows: one row per line, flushed as it is written.

    A kill can tear the last row (a line without its newline). Opening ends that line, so the
    torn row stays a line of its own, which `read_jsonl` skips, and the next row starts clean.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "ab")  # noqa: SIM115 (open for the life of the log)
        if self.file.tell() > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self.file.write(b"\n")
                    self.file.flush()

    def write(self, row: dict) -> None:
        self.file.write((json.dumps(row) + "\n").encode())
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_jsonl(path: Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The rows of a JSON-lines file, in order. A row that does not parse (a kill tore it) is
    skipped; one warning names the file and the lines skipped (to stderr unless `warn` is given)."""
    path = Path(path)
    rows, torn = [], []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                torn.append(number)
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                torn.append(number)
    if torn:
        message = (
            f"{path}: skipped {len(torn)} torn row(s) (line {', '.join(map(str, torn[:5]))}), "
            "left by a run killed while writing"
        )
        (warn or (lambda text: print(f"warning: {text}", file=sys.stderr, flush=True)))(message)
    return rows


class RefusedFile(ValueError):
    """A file `read_torch_file` would not unpickle; `cause` is torch's reason, in one sentence."""

    def __init__(self, path: Path, cause: str):
        super().__init__(f"{path}: refused ({cause})")
        self.cause = cause


def read_torch_file(path: Path, allowed: list | tuple = ()) -> object:
    """What torch.save wrote at `path`, read without running any code from the file: tensors,
    numbers, strings and containers of them, and the classes in `allowed` (torch's weights_only).
    A checkpoint folder or a shared cache may hold a file someone else wrote; a pickle that asks
    for anything else is refused (RefusedFile), never executed."""
    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, weights_only=True)
    except Exception as err:  # UnpicklingError and friends
        raise RefusedFile(path, _load_refusal_cause(err)) from None


def _load_refusal_cause(err: Exception) -> str:
    """The cause in torch.load's refusal, in one sentence: after its "WeightsUnpickler error:", or
    else in the paragraph after its preamble."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    text = text.split(marker, 1)[1] if marker in text else text.split("\n\n", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ")[0] if lines else type(err).__name__
