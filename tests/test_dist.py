"""fsdp/dist.py without a process group: the launcher watch under wrappers, which rank of a node
downloads the model, and ranks that would share a GPU."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import REPO

RANK = """
import os, sys, time
sys.path.insert(0, {repo!r})
from fsdp.dist import exit_with_launcher
exit_with_launcher(poll_seconds=0.05)
print("watching", os.getpid(), flush=True)
time.sleep(60)
"""

# torchrun starts each worker as the leader of a session of its own, and waits for it.
LAUNCHER = "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True).wait()"


def wait_for(log, text: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while text not in log.read_text() and time.time() < deadline:
        time.sleep(0.05)
    return log.read_text()


def test_a_rank_under_a_wrapper_watches_the_launcher_above_the_wrapper(tmp_path):
    """`torchrun --no-python wrap.sh` (or py-spy, nsys): the rank's parent is the wrapper, a shell,
    and the launcher is the wrapper's parent. The rank trains on, and stops once that launcher dies
    (the wrapper lives on, in its own session)."""
    (tmp_path / "rank.py").write_text(RANK.format(repo=REPO))
    wrapper = tmp_path / "wrap.sh"
    # Two commands: bash stays the rank's parent instead of exec'ing into it.
    wrapper.write_text(f'#!/bin/bash\n"{sys.executable}" "{tmp_path / "rank.py"}"\nexit $?\n')
    wrapper.chmod(0o755)
    log = tmp_path / "rank.log"
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "wrapped", "RANK": "0"}
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(wrapper)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    rank = None
    try:
        said = wait_for(log, "watching", timeout=60)
        assert "watching" in said, said
        rank = int(said.split("watching")[1].split()[0])
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        gone = f"rank 0: the launcher (torchrun, pid {launcher.pid}) is gone; stopping without writing anything more"
        said = wait_for(log, gone, timeout=10)
        assert gone in said, said
        deadline = time.time() + 5
        while time.time() < deadline and os.path.exists(f"/proc/{rank}"):
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{rank}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            launcher.kill()
        if rank is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank, signal.SIGKILL)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("local_rank", "local_world_size", "downloads"),
    [("0", "2", True), ("1", "2", False), ("3", "1", True)],
)
def test_the_node_first_rank_downloads_the_model(
    monkeypatch, tmp_path, local_rank, local_world_size, downloads
):
    """A lone rank numbered by its GPU (LOCAL_RANK=3, LOCAL_WORLD_SIZE=1) is its node's first:
    it downloads, or no rank would, and the look-up in the cache would fail."""
    import huggingface_hub

    from fsdp.model import resolve_model_folder

    calls = []

    def snapshot_download(name, allow_patterns, local_files_only=False):
        calls.append((name, local_files_only))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    assert resolve_model_folder("org/model") == tmp_path
    assert calls == [("org/model", False)] * downloads + [("org/model", True)]


@pytest.mark.fast
def test_ranks_that_would_share_a_gpu_are_named():
    from fsdp.dist import shared_gpu

    assert shared_gpu(4, 4, None) is None
    assert shared_gpu(2, 8, "0,1,2,3,4,5,6,7") is None
    # One GPU shown through CUDA_VISIBLE_DEVICES may be each rank's own.
    assert shared_gpu(8, 1, "3") is None
    assert shared_gpu(8, 4, "0,1,2,3") == (
        "LOCAL_WORLD_SIZE=8 but this node sees 4 GPU(s) (CUDA_VISIBLE_DEVICES=0,1,2,3): two ranks would "
        "share a GPU; use --nproc_per_node=4"
    )
    assert shared_gpu(2, 1, None) == (
        "LOCAL_WORLD_SIZE=2 but this node sees 1 GPU(s) (CUDA_VISIBLE_DEVICES=unset): two ranks would "
        "share a GPU; use --nproc_per_node=1"
    )


@pytest.mark.fast
def test_eight_ranks_on_four_gpus_are_refused_before_the_process_group(monkeypatch):
    from config import ConfigError, load_config
    from config.validate import validate_launch
    from fsdp.dist import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "5")
    cfg = load_config(["device=cuda"])
    message = (
        "LOCAL_WORLD_SIZE=8 but this node sees 4 GPU(s) (CUDA_VISIBLE_DEVICES=unset): two ranks would share"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_launch(cfg, 8, 8)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        pick_device("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    validate_launch(cfg, 8, 4)  # two nodes of 4
    assert pick_device("cuda") == torch.device("cuda", 3)
