"""Process group and device: CUDA + NCCL when a GPU is there, CPU + gloo otherwise.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each copy it starts
(on one node or many: multi-node is torchrun's own rendezvous). Started as plain `python train.py`
we fill them in for a world of one, so one code path serves every launch.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_type(preference: str = "auto") -> str:
    """cuda or cpu, as `device=` asks (auto: cuda when a GPU is visible); no device is touched."""
    return "cuda" if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()) else "cpu"


def pick_device(preference: str = "auto") -> torch.device:
    if device_type(preference) == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda: no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str = "auto") -> Dist:
    """Join (or, alone, create) the process group and a 1-D device mesh over all ranks."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))

    dev = pick_device(device)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        # torchrun pins every rank to one thread; on CPU, share the cores among this node's ranks.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local_world_size))

    if not dist.is_initialized():
        store = _attempt_store(rank, world_size)
        rendezvous = {"store": store, "rank": rank, "world_size": world_size} if store is not None else {}
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None, **rendezvous)
    return Dist(rank, world_size, local_rank, local_world_size, dev, backend, make_mesh(dev.type, world_size))


def make_mesh(device_type: str, world_size: int) -> DeviceMesh:
    """The 1-D mesh FSDP shards over: every rank of the process group, one dimension named "fsdp"."""
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("fsdp",))


def _attempt_store(rank: int, world_size: int) -> dist.Store | None:
    """Under torchrun with restarts, the rendezvous store with a prefix of its own for each attempt.

    torchrun (--standalone, c10d rendezvous) keeps one store across restarts of the group, and
    gloo finds its peers through keys in it: a restarted rank can read the address a dead rank of
    the previous attempt published, and fail to connect. A prefix per attempt keeps attempts apart.
    None (the default env:// rendezvous) outside torchrun's elastic agent.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return None
    from datetime import timedelta

    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_hosts_it and rank == 0,
        timeout=timedelta(minutes=10),
        multi_tenant=not agent_hosts_it,
    )
    return dist.PrefixStore(f"fulltune/attempt-{attempt}", store)


def exit_with_launcher(poll_seconds: float = 0.25) -> None:
    """Under torchrun: this rank exits the moment its launcher dies, and writes nothing more.

    torchrun starts each rank in a session of its own, so a kill of torchrun alone (a stuck
    launcher stopped by hand, a container runtime that signals only its main process) would leave
    the ranks training, and a relaunch would write the same run_dir beside them. On Linux the
    kernel signals the rank when its parent exits (PR_SET_PDEATHSIG); elsewhere, and as a
    fallback while the main thread waits inside a collective, a thread watches the parent pid.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # plain python: a parent that exits (a closed shell under nohup) stops nothing
    launcher = os.getppid()
    # Dead before the watch began, this rank was handed to a reaper (init, a subreaper); torchrun
    # starts its ranks with its own interpreter, so a parent running another program is not it.
    # (Not `ppid == 1`: torchrun is pid 1 when it is a container's entrypoint.)
    orphaned = not runs_interpreter(launcher, sys.executable)

    def stop_if_gone(*_: object) -> None:
        if os.getppid() != launcher or orphaned:
            message = (
                f"rank {os.environ.get('RANK', '?')}: the launcher (torchrun, pid {launcher}) is gone; "
                "stopping without writing anything more\n"
            )
            os.write(sys.stderr.fileno(), message.encode())
            os._exit(1)

    if sys.platform == "linux":
        import ctypes

        signal.signal(signal.SIGUSR2, stop_if_gone)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGUSR2, 0, 0, 0)  # 1: PR_SET_PDEATHSIG

    def watch() -> None:
        while True:
            stop_if_gone()
            time.sleep(poll_seconds)

    stop_if_gone()  # it may have died before the watch began
    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def runs_interpreter(pid: int, executable: str) -> bool:
    """Whether process `pid` runs `executable` (the same file, links resolved); True where /proc
    cannot tell (another OS, another user's process)."""
    try:
        return os.path.samefile(f"/proc/{pid}/exe", executable)
    except OSError:
        return True


def print0(*args: object, **kwargs: object) -> None:
    """print on rank 0 only (or always, before the process group exists)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def shutdown() -> None:
    # Without the barrier, a rank that finishes first can tear down gloo under the others.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def from_every_rank(value: object) -> list:
    """One picklable value from every rank, in rank order (all ranks call it)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone
