"""Memory, three views side by side: the analytic model, the fake-tensor estimate, a real step's ledger.

    torchrun --nproc_per_node=2 bench/memory_check.py                       # SmolLM2-135M, 2 CPU ranks
    python bench/memory_check.py --config bench/llama-1b.json --micro-batch 2 --seq 2048 \\
        --runs none,full,selective,act-offload,cpu-offload,bf16-moments --out memory-check.json   # the GPU check

For each run (a checkpointing mode, or a memory lever on top of the first run in the list: LEVERS
below): the analytic prediction (fsdp/memory/analytic.py), the ledger of
one step of rank 0 on fake tensors (before any process group exists), then the ledger of one real
steady-state step on full-length random tokens (FSDPMemTracker), with CUDA's allocator peaks on
a GPU. Rank 0 prints the tables and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import world_size_from_env
from durable import write_atomic
from fsdp import memory
from fsdp.dist import init_distributed, shutdown
from fsdp.memory.levers import MEMORY_LEVERS
from fsdp.memory.measure import measure_step, measure_step_on_fake_tensors
from fsdp.model import load_hf_config

# Each run's settings, as Workload fields over the base: every memory lever of fsdp/memory/levers.py
# by its key (ac-full, split-root, ...), and the short names of the checkpointing modes and
# offloads. The levers go on top of the first run of --runs; cpu-offload needs a GPU (it offloads
# to the host from one).
LEVERS = {
    **{lever.key: lever.fields for lever in MEMORY_LEVERS},
    "none": {"checkpointing": "none"},
    "full": {"checkpointing": "full"},
    "every_k": {"checkpointing": "every_k"},
    "selective": {"checkpointing": "selective"},
    "act-offload": {"activation_offload": True},
}


def workloads(base: memory.Workload, runs: list[str]) -> dict[str, memory.Workload]:
    """Each named run's workload: a checkpointing mode replaces the base's, a lever goes on the first run's."""
    unknown = [r for r in runs if r not in LEVERS]
    if unknown:
        raise SystemExit(f"--runs: unknown {', '.join(unknown)}; known: {', '.join(LEVERS)}")
    first = replace(base, **LEVERS[runs[0]])
    return {r: replace(first, **LEVERS[r]) for r in runs}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=".cache/models/SmolLM2-135M-Instruct", help="model folder or config.json"
    )
    parser.add_argument("--precision", default="mixed", choices=("mixed", "bf16", "fp32"))
    parser.add_argument(
        "--runs", "--checkpointing", default="none,full", help=f"comma-separated: {', '.join(LEVERS)}"
    )
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument(
        "--accum", type=int, default=1, help="micro-batches a step (2 shows what accumulation keeps)"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-fake", action="store_true", help="skip the fake-tensor estimate")
    parser.add_argument("--out", type=Path, help="write the tables as JSON here (rank 0)")
    args = parser.parse_args()

    hf_config = load_hf_config(args.config)
    shape = memory.ModelShape.from_hf_config(hf_config)
    world_size = world_size_from_env()
    base = memory.Workload(
        world_size,
        args.precision,
        micro_batch_size=args.micro_batch,
        seq_len=args.seq,
        chunk_tokens=args.chunk_tokens,
        grad_accum_steps=args.accum,
        every_k=2,
    )
    runs = workloads(base, args.runs.split(","))
    # Fake tensors first: their process group is a fake one, made and destroyed before the real.
    is_main = int(os.environ.get("RANK", "0")) == 0
    fakes = {}
    if is_main and not args.no_fake:
        for name, w in runs.items():
            fakes[name] = measure_step_on_fake_tensors(hf_config, w)

    d = init_distributed(args.device)
    results = {}
    for mode, w in runs.items():
        if w.cpu_offload and d.device.type != "cuda":
            print(f"{mode}: skipped, CPU offload needs a GPU to offload from", flush=True)
            continue
        w = replace(w, device=d.device.type)
        if d.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(d.device)
            baseline = torch.cuda.memory_allocated(d.device)
        measured = measure_step(hf_config, d, w)
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
            measured["cuda max allocated"] = torch.cuda.max_memory_allocated(d.device) - baseline
            measured["cuda max reserved"] = torch.cuda.max_memory_reserved(d.device)
        predicted = memory.predict(shape, w)
        results[mode] = {"analytic": predicted, "fake": fakes.get(mode), "measured": measured}
        columns = memory.columns("analytic", predicted)
        if mode in fakes:
            columns.update(memory.columns("fake", fakes[mode]))
        columns.update(memory.columns("measured", measured))
        if d.is_main:
            print(
                f"\n{args.config}: {shape.num_params:,} params, {world_size} x {d.device.type}, {args.precision}, "
                f"{mode} (checkpointing {w.checkpointing}), micro-batch {args.micro_batch} x {args.seq} "
                "(GiB per rank, rank 0)",
                flush=True,
            )
            print(memory.format_table(columns), flush=True)
            print(memory.format_table(columns, memory.PHASE_ROWS).split("\n", 1)[1], flush=True)
            if "cuda max allocated" in measured:
                # The target: the ledger's device peak within 3% of what CUDA's allocator counted.
                ledger = measured["device"]["peak"] if "device" in measured else measured["peak"]
                cuda = measured["cuda max allocated"]
                verdict = "PASS" if abs(ledger - cuda) <= 0.03 * cuda else "FAIL"
                print(
                    f"{verdict} {mode}: ledger device peak {memory.gib(ledger)}, cuda max allocated "
                    f"{memory.gib(cuda)} ({(ledger - cuda) / cuda:+.1%}); analytic {memory.gib(predicted['device']['peak'])}",
                    flush=True,
                )
        del measured
    if d.is_main and args.out:
        write_atomic(args.out, json.dumps(results, indent=1, default=str))
    dist.barrier()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
