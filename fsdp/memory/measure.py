"""One training step under the ledger: on real tensors, or on fake ones for ranks that do not exist.

This is what the estimate (estimate.py) and the memory tests run: the real build (fsdp/build.py),
the real AdamW and the real train_step (fsdp/step.py), on synthetic full-length batches, which
have the shapes of a real batch and the memory of the worst one.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from batch import Batch
from fsdp.adamw import init_state, make_adamw, param_groups
from fsdp.build import build_sharded_model
from fsdp.dist import Dist
from fsdp.fake import fake_process_group, fake_tensors
from fsdp.memory.analytic import Workload
from fsdp.memory.ledger import MemoryLedger
from fsdp.step import train_step


def synthetic_batch(micro_batch_size: int, seq_len: int) -> Batch:
    """Full-length sequences, every position a target: the shapes of a real batch, the memory of the worst.

    Positions are left to the model (0 .. seq_len - 1, as in unpacked data): given positions, HF
    checks their values for restarts (packed sequences), which fake tensors do not have, and would
    then build the attention mask that packed sequences need.
    """
    ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long)
    tokens = micro_batch_size * seq_len
    return Batch(ids, ids.clone(), None, tokens, tokens)


def measured_micro_batches(w: Workload) -> int:
    """Micro-batches a measured step runs: a second one shows what accumulation keeps (or repeats)."""
    return min(w.grad_accum_steps, 2)


def measure_step(
    hf_config,
    distributed: Dist,
    workload: Workload,
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    state_on_host: bool = False,
) -> dict:
    """The ledger of one steady-state training step of `workload` on synthetic full-length batches;
    `state_on_host`: booking the model state in host memory, as fsdp.cpu_offload would keep it."""
    model = build_sharded_model(hf_config, distributed, workload.build)
    # The betas change no byte; the config's default ones, which a bf16 state accepts (fsdp/adamw.py).
    groups = param_groups(model, weight_decay, workload.decay_embeddings)
    optimizer = make_adamw(
        groups, workload.optim_impl, lr=1e-5, betas=(0.9, 0.95), state_dtype=workload.state_dtype
    )
    init_state(optimizer)  # steady state: m and v exist before the step, as from step 2 on
    batches = [
        synthetic_batch(workload.micro_batch_size, workload.seq_len).to(distributed.device)
        for _ in range(measured_micro_batches(workload))
    ]
    ledger = MemoryLedger(model, optimizer, hf_config.vocab_size, distributed.device, state_on_host)
    for b in batches:
        ledger.track_inputs((b.input_ids, b.labels))
    with ledger:
        train_step(model, optimizer, batches, max_grad_norm, workload.reduce_grads_every_microbatch)
    return ledger.result()


def measure_step_on_fake_tensors(hf_config, w: Workload, max_grad_norm: float | None = 1.0) -> dict:
    """measure_step for rank 0 of w.world_size ranks that do not exist, every tensor fake (no memory),
    on w's mesh (1-D, or HSDP's replicas x shards).

    Offloading (w.cpu_offload) needs a GPU to offload from: the fake step runs on one CPU without
    it, and the ledger books the model state, and the optimizer step's temporaries, in the host's
    column, where CPUOffloadPolicy keeps them (what the device does not then allocate, each unit's
    shards copied in for its all-gather, is the analytic model's alone). Activation offloading runs
    as on any CPU run: the ledger books its host copies apart.
    """
    with fake_process_group(w.world_size, w.replicate) as d, fake_tensors():
        return measure_step(
            hf_config,
            d,
            replace(w, cpu_offload=False),
            max_grad_norm=max_grad_norm,
            state_on_host=w.cpu_offload,
        )
