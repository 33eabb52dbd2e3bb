"""Shared by the tests: spawned gloo process groups, tiny models, synthetic ragged data."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable

import torch

from fsdp.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, ".cache", "models", "SmolLM2-135M-Instruct")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        from fsdp.dist import init_distributed, shutdown

        d = init_distributed("cpu", "gloo")
        result = fn(d, *args)
        shutdown()
        # Plain pickle: tensors travel by value, not as shared memory the exiting child would take along.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 600) -> list:
    """Run fn(dist, *args) on `world_size` spawned ranks (CPU, gloo); return each rank's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def tiny_config(arch: str = "llama", vocab_size: int = 256, layers: int = 2, tie: bool = True):
    """A small random-init config of a real HF architecture."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    if arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            tie_word_embeddings=tie,
        )
    return AutoConfig.for_model(arch, **common)


def ragged_examples(
    n: int, vocab_size: int = 256, min_len: int = 5, max_len: int = 40, seed: int = 0
) -> list[dict]:
    """Random token sequences of varied length; the first part of each is a masked 'prompt'."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(0, vocab_size, (length + 1,), generator=g).tolist()
        prompt = int(torch.randint(1, length, (1,), generator=g))
        labels = [-100] * (prompt - 1) + ids[prompt:]
        examples.append({"input_ids": ids[:-1], "labels": labels})
    return examples


def run(
    argv: list[str], nproc: int | None, env: dict[str, str] | None = None, launcher_args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """train.py as users run it: under torchrun with `nproc` ranks, or plain python (None)."""
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *launcher_args,
        ]
        if nproc
        else [sys.executable]
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [*launcher, "train.py", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def fault(**spec) -> dict[str, str]:
    """The environment that arms a fault (fsdp/faults.py): fault(action="kill", at="step", step=2)."""
    return {"FULLTUNE_FAULT": ",".join(f"{k}={v}" for k, v in spec.items())}


def losses(run_dir) -> list[float]:
    """The per-step losses a run logged (metrics.jsonl), in step order."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    return [r["train/loss"] for r in rows if "train/loss" in r]


def node_checkouts(root, nodes: int = 2) -> list:
    """Copies of this checkout, one per simulated node: their own files and caches, nothing shared.

    The converted default model is linked in (as each node would have downloaded it); the
    tokenized cache, the runs and everything else are each copy's own.
    """
    import shutil
    from pathlib import Path

    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    copies = []
    for node in range(nodes):
        copy = Path(root) / f"node{node}"
        for name in listed:
            if os.path.isfile(os.path.join(REPO, name)):
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.join(REPO, name), copy / name)
        (copy / ".cache").mkdir(exist_ok=True)
        (copy / ".cache" / "models").symlink_to(os.path.join(REPO, ".cache", "models"))
        copies.append(copy)
    return copies


def run_nodes(
    checkouts: list, argv: list[str], extra: list[list[str]] | None = None, env=None, timeout: float = 300
) -> list[subprocess.CompletedProcess]:
    """train.py on len(checkouts) nodes of one rank each, as on a cluster: one torchrun per node,
    each in its own checkout, meeting through torchrun's c10d rendezvous on one port."""
    port = _free_port()
    procs = []
    for node, checkout in enumerate(checkouts):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={len(checkouts)}",
            "--nproc_per_node=1",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=fulltune-test",
            "--max_restarts=0",
            "train.py",
            *argv,
            *((extra or [[]] * len(checkouts))[node]),
        ]
        procs.append(
            subprocess.Popen(
                command,
                cwd=checkout,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 9)
            raise AssertionError(
                f"{len(checkouts)} nodes did not finish within {timeout} s (a hang)"
            ) from None
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def readme_command(*commands: str) -> Callable:
    """Marks the test that runs these commands of the README or a docs/ page, scaled down:
    tests/test_readme.py fails for a command a page shows that no test claims, and for a claim no
    page shows. Each command is written as its page shows it, continuation lines joined."""

    def claim(test: Callable) -> Callable:
        test.readme_commands = (*getattr(test, "readme_commands", ()), *commands)
        return test

    return claim
