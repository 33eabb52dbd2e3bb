"""How a model is sharded over N ranks, and what one training step sends. No training.

    python explain.py model=smollm2-135m memory.world_size=2                     # or: make explain

The real build, sharding and train_step, on fake tensors and a fake process group (as estimate.py),
so Llama-3-8B at 8 ranks runs on a laptop: the shard layout of every FSDP unit on every rank
(fsdp/shard.py), then the collectives and compute of one step in order, and their bytes beside
the theory (fsdp/comm.py). Any config key of train.py applies.
"""

from __future__ import annotations

import sys

import config
from config import views
from fsdp import comm
from fsdp.adamw import AdamW, param_groups
from fsdp.build import build_sharded_model
from fsdp.fake import fake_process_group, fake_tensors
from fsdp.layout import describe_units, format_units
from fsdp.memory.measure import measured_micro_batches, synthetic_batch
from fsdp.step import train_step


def main(argv: list[str]) -> int:
    try:
        cfg, hf_config, w = views.studied_run(argv)
    except config.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    n, micro_batches = w.world_size, measured_micro_batches(w)
    with fake_process_group(n) as d, fake_tensors():
        model = build_sharded_model(hf_config, d, w.build)
        units = describe_units(model, n, w.precision)
        optimizer = AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
        batches = [synthetic_batch(w.micro_batch_size, w.seq_len) for _ in range(micro_batches)]
        with comm.CommTracker(model, n) as counter:
            train_step(model, optimizer, batches, cfg.optim.max_grad_norm, w.reduce_grads_every_microbatch)
    theory = comm.theory_for(
        units, n, micro_batches, w.precision, w.reduce_grads_every_microbatch, w.reduce_dtype
    )
    sections = [
        f"{cfg.model.name_or_path} ({type(hf_config).__name__.removesuffix('Config')}), {n} ranks, "
        f"{w.precision}, micro-batch {w.micro_batch_size} x {w.seq_len}, activation checkpointing "
        f"{w.checkpointing}",
        format_units(units, n, w.precision),
        f"one optimizer step of {micro_batches} micro-batches, rank 0, in order:\n"
        + comm.format_order(counter.ledger, [u.name for u in units]),
        comm.format_totals(counter.ledger, theory),
    ]
    print("\n\n".join(sections), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
