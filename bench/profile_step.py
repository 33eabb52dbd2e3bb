"""Where a train.py step spends its time: torch.profiler over one steady-state step, rank 0's top ops.

    torchrun --nproc_per_node=2 bench/profile_step.py             # SmolLM2-135M, make bench's batches
    torchrun --nproc_per_node=2 bench/profile_step.py --trace t.json   # also a Chrome/Perfetto trace
    torchrun --nproc_per_node=2 bench/profile_step.py precision=mixed optim.impl=fused   # train.py overrides

The step is train.py's own `train_step` on FSDP2, built as train.py builds it from preset=cpu-demo
and the overrides given (so `precision=auto`, the default, takes what it takes on this machine, as
make bench does, and the levers apply: fsdp.*, compile, optim.impl), with make bench's geometry (8
sequences of at most 128 tokens a step, micro-batch 2) on the same global batches (bench/peers.py);
two steps warm up, the third is profiled. Prints the ops by self time (CPU; CUDA too on a GPU),
grouped so the collectives, the matmuls and the optimizer stand out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from peers import MODEL, global_batches  # noqa: E402

from config import settings  # noqa: E402
from config.compose import load_config, resolve_precision  # noqa: E402
from data.loader import collate  # noqa: E402
from fsdp.adamw import init_state, make_adamw, param_groups  # noqa: E402
from fsdp.build import build_sharded_model  # noqa: E402
from fsdp.dist import init_distributed, shutdown  # noqa: E402
from fsdp.model import load_hf_config  # noqa: E402
from fsdp.step import train_step  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. precision=mixed compile=true")
    args = parser.parse_args(argv)
    cfg = load_config(["preset=cpu-demo", *args.overrides])
    d = init_distributed()
    reason = resolve_precision(cfg, d.device.type)
    model = build_sharded_model(load_hf_config(MODEL), d, settings.build_settings(cfg), pretrained=MODEL)
    o = cfg.optim
    optimizer = make_adamw(
        param_groups(model, o.weight_decay, o.decay_embeddings), **settings.adamw_settings(cfg)
    )
    init_state(optimizer)
    if d.is_main:
        print(
            f"precision {reason}; optim.impl={o.impl}; overrides: {' '.join(args.overrides) or 'none'}",
            flush=True,
        )
    batches, pad_id = global_batches(MODEL, 3, args.global_batch, args.seq)
    per_rank = args.global_batch // d.world_size

    def micro_batches(step: int) -> list:
        # Rank r's share of the global batch, as the loader slices it: micro-step k takes slice k * N + r.
        mine = []
        for k in range(per_rank // args.micro_batch):
            start = (k * d.world_size + d.rank) * args.micro_batch
            mine.append(collate(batches[step][start : start + args.micro_batch], pad_id).to(d.device))
        return mine

    for step in range(2):
        train_step(model, optimizer, micro_batches(step), 1.0)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if d.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        train_step(model, optimizer, micro_batches(2), 1.0)
    if d.is_main:
        sort = "self_cuda_time_total" if d.device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows), flush=True)
        if args.trace:
            prof.export_chrome_trace(str(args.trace))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
