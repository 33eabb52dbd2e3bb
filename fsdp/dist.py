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
from datetime import timedelta
from pathlib import Path

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
    backend: str  # as the process group was made: "gloo", "nccl", or "cuda:nccl,cpu:gloo" (offload)
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        """The one rank of its node that writes the node's own disk (its caches)."""
        return first_of_node(self.local_rank, self.local_world_size)

    @property
    def replicas(self) -> int:
        """HSDP's replicate degree (1: plain FSDP, every rank holds a different shard)."""
        return self.mesh.size(0) if self.mesh.ndim == 2 else 1

    @property
    def shard_size(self) -> int:
        """Ranks that share one copy of the model state, each holding 1/shard_size of it."""
        return self.mesh.size(self.mesh.ndim - 1)

    def describe_mesh(self) -> str:
        if self.replicas == 1:
            return f"1-D mesh: {self.world_size} ranks each hold 1/{self.world_size} of the model state"
        return (
            f"2-D mesh (HSDP): {self.replicas} replicas x {self.shard_size} shards; state sharded within "
            "a node, gradients all-reduced across nodes"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_type(preference: str = "auto") -> str:
    """cuda or cpu, as `device=` asks (auto: cuda when a GPU is visible); no device is touched."""
    return "cuda" if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()) else "cpu"


def device_index(local_rank: int, visible: int) -> int:
    """The GPU of this rank among those it sees: LOCAL_RANK, modulo the visible count, since a
    launcher that shows each process its own GPU (CUDA_VISIBLE_DEVICES per rank) leaves one."""
    return local_rank % max(1, visible)


def shared_gpu(local_world_size: int, visible: int, visible_devices: str | None) -> str | None:
    """Why two ranks of this node would train on one GPU (one line), or None.

    `visible` GPUs this rank sees, `visible_devices` its CUDA_VISIBLE_DEVICES. Ranks that see the
    same GPUs (the variable unset: all of the node's) take distinct ones only if there are enough.
    One visible GPU through the variable may be this rank's own (a launcher that shows each rank
    its GPU, torchrun --virtual-local-rank), so that case is left to device_index.
    """
    if local_world_size <= visible or (visible == 1 and visible_devices is not None):
        return None
    return (
        f"LOCAL_WORLD_SIZE={local_world_size} but this node sees {visible} GPU(s) "
        f"(CUDA_VISIBLE_DEVICES={'unset' if visible_devices is None else visible_devices}): two ranks "
        f"would share a GPU; use --nproc_per_node={visible}"
    )


def pick_device(preference: str = "auto") -> torch.device:
    if device_type(preference) == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda: no CUDA device is visible")
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        problem = shared_gpu(
            local_world_size, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        if problem:
            raise RuntimeError(problem)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))
    return torch.device("cpu")


def process_group_backend(device: torch.device, backend: str = "auto", cpu_offload: bool = False) -> str:
    """gloo on CPU, NCCL on GPUs; with CPU offload also gloo for the host tensors (the gradient
    norm's all-reduce and the export's gathers run on offloaded shards, which NCCL cannot touch)."""
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and cpu_offload:
        return "cuda:nccl,cpu:gloo"
    return backend


def nodes(world_size: int, local_world_size: int) -> int:
    """Nodes in the run, as torchrun lays ranks out: LOCAL_WORLD_SIZE consecutive ranks per node."""
    return max(1, world_size // max(1, local_world_size))


def replicate_degree(choice: int | str, world_size: int, local_world_size: int) -> int:
    """fsdp.replicate: auto is one replica per node (shard within a node, where the links are
    fast; only a gradient shard crosses nodes), so 1 on a single node; an integer is taken as is."""
    return nodes(world_size, local_world_size) if choice == "auto" else int(choice)


def init_distributed(
    device: str = "auto",
    backend: str = "auto",
    replicate: int | str = 1,
    cpu_offload: bool = False,
    timeout_s: float = 1800,
) -> Dist:
    """Join (or, alone, create) the process group and the device mesh FSDP shards over.

    `timeout_s` bounds every collective of the set-up, where ranks wait for one to tokenize the
    data or read a checkpoint; `set_timeout` shortens it once training starts.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))

    dev = pick_device(device)
    backend = process_group_backend(dev, backend, cpu_offload)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dev.type == "cpu" or cpu_offload:
        # torchrun pins every rank to one thread; the host's work (all of it on CPU, AdamW on the
        # offloaded shards on GPUs) gets this node's cores, shared among its ranks.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local_world_size))

    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = _attempt_store(rank, world_size, timeout)
        rendezvous = {"store": store, "rank": rank, "world_size": world_size} if store is not None else {}
        dist.init_process_group(
            backend=backend, device_id=dev if dev.type == "cuda" else None, timeout=timeout, **rendezvous
        )
    replicas = replicate_degree(replicate, world_size, local_world_size)
    mesh = make_mesh(dev.type, world_size, replicas)
    set_timeout(timeout_s)  # the mesh's own groups start with torch's default timeout, not this one
    return Dist(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=dev,
        backend=backend,
        mesh=mesh,
    )


def set_timeout(seconds: float) -> None:
    """Every process group's timeout from now on (training: a hung collective is found sooner).

    Not only the default group: the device mesh's groups (HSDP's replicate and shard groups,
    where FSDP's gathers and reductions run) are groups of their own, made with torch's default
    timeout (30 minutes on gloo, 10 on NCCL), whatever the default group was given.
    """
    c10d = dist.distributed_c10d
    for group in list(c10d._world.pg_map):
        c10d._set_pg_timeout(timedelta(seconds=seconds), group)


def make_mesh(device_type: str, world_size: int, replicate: int = 1) -> DeviceMesh:
    """The mesh FSDP shards over. 1-D ("dp_shard"): every rank holds 1/N of the model state.
    2-D (HSDP, torchtitan's dp_replicate x dp_shard): ranks r*S .. r*S+S-1 (a node, as torchrun
    numbers them) shard one copy of the state; the R copies are replicas, kept equal by an
    all-reduce of each gradient shard across them."""
    if replicate <= 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp_shard",))
    if world_size % replicate:
        raise ValueError(f"fsdp.replicate={replicate} does not divide the {world_size} ranks")
    return init_device_mesh(
        device_type, (replicate, world_size // replicate), mesh_dim_names=("dp_replicate", "dp_shard")
    )


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun with restarts, the rendezvous store with a prefix of its own for each attempt.

    torchrun (--standalone, c10d rendezvous) keeps one store across restarts of the group, and
    gloo finds its peers through keys in it: a restarted rank can read the address a dead rank of
    the previous attempt published, and fail to connect. A prefix per attempt keeps attempts apart.
    None (the default env:// rendezvous) outside torchrun's elastic agent.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return None
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_hosts_it and rank == 0,
        timeout=timeout,
        multi_tenant=not agent_hosts_it,
    )
    return dist.PrefixStore(f"fulltune/attempt-{attempt}", store)


def exit_with_launcher(poll_seconds: float = 0.25) -> None:
    """Under torchrun: this rank exits the moment its launcher dies, and writes nothing more.

    torchrun starts each rank in a session of its own, so a kill of torchrun alone (a stuck
    launcher stopped by hand, a container runtime that signals only its main process) would leave
    the ranks training, and a relaunch would write the same run_dir beside them. On Linux the
    kernel signals the rank when its parent exits (PR_SET_PDEATHSIG); elsewhere, and as a
    fallback while the main thread waits inside a collective, a thread watches the launcher: the
    parent, or above a wrapper (`torchrun --no-python` with a script, py-spy, nsys) the wrapper's.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # plain python: a parent that exits (a closed shell under nohup) stops nothing
    launcher = find_launcher()
    # Dead before the watch began, torchrun left its worker to a reaper (init, a subreaper);
    # torchrun runs its own interpreter, so a launcher running another program is not it.
    # (Not `pid == 1`: torchrun is pid 1 when it is a container's entrypoint.)
    orphaned = launcher is None or not runs_interpreter(launcher, sys.executable)

    def stop_if_gone(*_: object) -> None:
        if orphaned or find_launcher() != launcher:
            message = (
                f"rank {os.environ.get('RANK', '?')}: the launcher (torchrun, pid "
                f"{'?' if launcher is None else launcher}) is gone; stopping without writing anything more\n"
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


def find_launcher() -> int | None:
    """The pid of the process that started this rank's session; None when the session's leader
    is no longer among this rank's ancestors (it died, and its children went to a reaper).

    torchrun starts each worker as the leader of a session of its own. The worker is the rank
    itself, or a wrapper that starts it (a `--no-python` script, `py-spy record --`, `nsys
    profile`), so torchrun is the parent of the session's leader, however many wrappers lie
    between. Where /proc cannot tell (another OS), the parent.
    """
    session, parent = os.getsid(0), os.getppid()
    if os.getpid() == session or not os.path.isdir("/proc"):
        return parent
    pid = parent
    while True:
        fields = proc_stat(pid)  # state, ppid, pgrp, session, ...
        if fields is None or int(fields[3]) != session:
            return None  # out of the session without meeting its leader
        if pid == session:
            return int(fields[1])
        pid = int(fields[1])


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the program's name (state, ppid, pgrp, session, ...,
    start time at [19]); None if the process is gone or there is no /proc to read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The program's name, in parentheses, may hold spaces and parentheses: the last ")" ends it.
    return stat.rsplit(")", 1)[1].split() if ")" in stat else None


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


def from_main(value: object) -> object:
    """Rank 0's value of `value`, on every rank (all ranks call it): one view of what rank 0 decided."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_of_node(local_rank: int, local_world_size: int) -> bool:
    """Local rank 0, or a rank alone on its node (a launcher may number a lone process by its GPU,
    LOCAL_RANK=3): the rank that speaks and writes for its node."""
    return local_rank == 0 or local_world_size == 1


def speaks_for_node() -> bool:
    """Whether this rank prints what its node's log must hold (from the launcher's environment:
    it also answers before the process group exists)."""
    return first_of_node(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "0")))


def print_per_node(*args: object, **kwargs: object) -> None:
    """print once on every node: a message each node's log must hold (an error found together)."""
    if speaks_for_node():
        print(*args, **kwargs, flush=True)
