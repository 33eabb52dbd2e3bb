"""How a model is sharded over N ranks, and what one training step sends. No training.

    python explain.py model=smollm2-135m memory.world_size=2                     # or: make explain
    python explain.py model=llama3-8b memory.world_size=16 memory.nodes=2       # HSDP: 2 x 8

The real build, sharding and train_step, on fake tensors and a fake process group (as estimate.py),
so Llama-3-8B at 8 ranks runs on a laptop: the mesh, the shard layout of every FSDP unit on every
rank of a shard group (fsdp/shard.py), then the collectives and compute of one step in order, and
their bytes beside the theory (fsdp/comm.py), HSDP's all-reduce across replicas included. Any
config key of train.py applies.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import config
from config import settings
from fsdp import comm
from fsdp.adamw import AdamW, param_groups
from fsdp.build import build_sharded_model
from fsdp.fake import fake_process_group, fake_tensors
from fsdp.layout import describe_units, format_units
from fsdp.memory.measure import measured_micro_batches, synthetic_batch
from fsdp.step import train_step


def main(argv: list[str]) -> int:
    try:
        cfg, hf_config, w = settings.studied_run(argv)
    except config.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    n, micro_batches = w.world_size, measured_micro_batches(w)
    with fake_process_group(n, w.replicate) as d, fake_tensors():
        model = build_sharded_model(hf_config, d, replace(w.build, cpu_offload=False))
        units = describe_units(model, d.shard_size, w.precision)
        optimizer = AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
        batches = [synthetic_batch(w.micro_batch_size, w.seq_len) for _ in range(micro_batches)]
        with comm.CommTracker(model, n) as counter:
            train_step(model, optimizer, batches, cfg.optim.max_grad_norm, w.reduce_grads_every_microbatch)
    theory = comm.theory_for(
        units,
        n,
        micro_batches,
        precision=w.precision,
        reduce_every_microbatch=w.reduce_grads_every_microbatch,
        reduce_dtype=w.reduce_dtype,
        replicate=w.replicate,
    )
    sections = [
        f"{cfg.model.name_or_path} ({type(hf_config).__name__.removesuffix('Config')}), {n} ranks, "
        f"{w.precision}, micro-batch {w.micro_batch_size} x {w.seq_len}, activation checkpointing "
        f"{w.checkpointing}\n{d.describe_mesh()}",
        format_units(units, d.shard_size, w.precision),
        f"one optimizer step of {micro_batches} micro-batches, rank 0, in order:\n"
        + comm.format_order(counter.ledger, [u.name for u in units]),
        comm.format_totals(counter.ledger, theory) + per_link(theory, d.shard_size, d.replicas),
    ]
    print("\n\n".join(sections), flush=True)
    return 0


def per_link(theory: dict, shards: int, replicas: int) -> str:
    """HSDP: what each rank sends per step within its shard group (a node) and across replicas (between nodes)."""
    if replicas == 1:
        return ""
    inside = sum(theory[kind]["sent_bytes"] for kind in ("all-gather", "reduce-scatter"))
    across = theory["all-reduce"]["sent_bytes"]
    return (
        f"\neach rank sends per step (theory, ring): {inside / 2**20:,.2f} MiB within its shard group of "
        f"{shards} (all-gathers, reduce-scatters), {across / 2**20:,.2f} MiB across the {replicas} replicas "
        "(the all-reduce of its gradient shard)"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
