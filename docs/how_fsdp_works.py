"""Writes docs/how-fsdp-works.md from the real output of this code: `make tour` (about 4 minutes, 2 cores).

Every number in the tour comes from a command it runs here, and the commands are printed in the
tour, so it cannot drift from the code: regenerate it after changing the code.

    1. `explain.py` for SmolLM2-135M at 2 ranks: the shard layout, one step's collectives
    2. a real 2-rank step of the default job (`train.py`) with memory.track=true and comm.track=true:
       the memory ledger, the bytes each collective kind moved, the time split and FLOP/s
    3. `explain.py` and `estimate.py` for Llama-3-8B at 8 ranks, on fake tensors
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "how-fsdp-works.md"
RUN_DIR = Path("runs") / "tour"  # relative to REPO, as the quoted command says
sys.path.insert(0, str(REPO))
from durable import write_atomic  # noqa: E402 (after the path is set)
from fsdp.metrics import read_metrics  # noqa: E402 (after the path is set)

# The default job, 2 micro-batches per step, in mixed precision as on a GPU (auto would pick fp32 on
# an AVX2-only CPU), so the real step moves the bytes explain.py predicts for the GPU recipe.
SMOL = ["preset=cpu-demo", "batch.grad_accum_steps=2", "precision=mixed"]
EXPLAIN_SMOL = ["preset=none", "model=smollm2-135m", "memory.world_size=2",
                "batch.micro_batch_size=2", "batch.max_seq_length=128", "batch.grad_accum_steps=2",
                "activation_checkpointing.mode=none"]  # fmt: skip
REAL_SMOL = [*SMOL, f"run_dir={RUN_DIR}", "overwrite=true", "train.max_steps=3", "memory.track=true",
             "comm.track=true", "eval.sets=[]", "eval.max_new_tokens=0", "export.enabled=false",
             "checkpoint.at_end=false"]  # fmt: skip
LLAMA = ["preset=none", "model=llama3-8b", "memory.world_size=8"]  # the classic recipe's batch


def run(program: str, argv: list[str], nproc: int | None = None) -> str:
    """Output of `program` (train.py, explain.py, estimate.py) run with `argv`, under torchrun if nproc."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*(launcher if nproc else [sys.executable]), program, *argv]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    # tqdm redraws with carriage returns: keep what the last redraw of each line says.
    return "\n".join(line.split("\r")[-1] for line in done.stdout.splitlines())


def shell(program: str, argv: list[str], nproc: int | None = None) -> str:
    """The command line `run(program, argv, nproc)` stands for, as the tour quotes it."""
    return (f"torchrun --nproc_per_node={nproc} " if nproc else "python ") + f"{program} " + " ".join(argv)


def section(text: str, start: str, end: str | None = None) -> str:
    """The lines of `text` from the first that starts with `start` up to (not including) `end`."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    last = next(
        (i for i, line in enumerate(lines[first + 1 :], first + 1) if end and line.startswith(end)),
        len(lines),
    )
    return "\n".join(lines[first:last]).rstrip()


def block(text: str) -> str:
    return "```\n" + text.strip("\n") + "\n```"


def main() -> int:
    explain_smol = run("explain.py", EXPLAIN_SMOL)
    real = run("train.py", REAL_SMOL, nproc=2)
    rows = read_metrics(REPO / RUN_DIR / "metrics.jsonl")
    # The memory ledger slows the steps it tracks (the first and the last): time the middle one.
    step2 = next(r for r in rows if r.get("step") == 2 and "train/loss" in r)
    explain_llama = run("explain.py", LLAMA)
    estimate_llama = run("estimate.py", [*LLAMA, "memory.fit_gib=80"])
    shutil.rmtree(REPO / RUN_DIR, ignore_errors=True)

    comm_lines = [line for line in real.splitlines() if line.startswith("comm step")]
    memory_table = section(real, "memory of rank 0 (GiB)", "comm step")
    smol_layout = section(explain_smol, "FSDP units over", "one optimizer step")
    smol_order = section(explain_smol, "one optimizer step", "collective")
    smol_totals = section(explain_smol, "collective")
    llama_layout = section(explain_llama, "FSDP units over", "one optimizer step")
    llama_totals = section(explain_llama, "collective")
    llama_estimate = (
        section(estimate_llama, "per category", None) if "per category" in estimate_llama else estimate_llama
    )
    time_split = ", ".join(
        f"{k.removeprefix('time/').removesuffix('_s').replace('_', ' ')} {v:.2f} s"
        for k, v in step2.items()
        if k.startswith("time/")
    )
    model_gb = re.search(r"per rank: ([\d,.]+ MiB) of parameters stored", smol_layout).group(1)
    # Llama-3-8B's step, per micro-batch (the explanation runs 2): what each rank receives.
    payload = {
        kind: float(
            re.search(rf"^{kind}\s+\d+\s+([\d,.]+) MiB", llama_totals, re.M).group(1).replace(",", "")
        )
        for kind in ("all-gather", "reduce-scatter")
    }
    gather_gib = payload["all-gather"] / 2 * 7 / 8 / 1024  # per micro-batch, (N-1)/N of the payload
    reduce_gib = payload["reduce-scatter"] * 7 / 8 / 1024  # once per step
    nvlink_ms = gather_gib * 2**30 / 450e9 * 1e3  # H100 NVLink: about 450 GB/s each way
    sys.path.insert(0, str(REPO))

    from fsdp.flops import PEAK_TFLOPS, FlopsModel
    from fsdp.memory import ModelShape
    from fsdp.model import load_hf_config
    from fsdp.precision import this_cpu

    # bf16 matmuls are native on CPUs with AVX-512 BF16 or AMX and emulated (10-50x slower) on AVX2.
    here = this_cpu()
    cpu = f"{here.describe()}, {os.cpu_count()} cores; the step computes in bf16, " + (
        "native here" if here.bf16_native else "emulated here"
    )
    llama_flops = FlopsModel.from_shape(
        ModelShape.from_hf_config(load_hf_config(REPO / "conf/model/llama3-8b.json"))
    )
    micro_tflop = 2 * 2048 * llama_flops.model_flops_per_token(2048) / 1e12
    compute_ms = micro_tflop / (0.5 * PEAK_TFLOPS["H100"]) * 1e3

    text = f"""# How FSDP works: one optimizer step of this code, byte by byte

*Generated by `make tour` ([`docs/how_fsdp_works.py`](how_fsdp_works.py)) from the output of the
commands quoted below; do not edit by hand.* Written for someone who has used DDP
(`DistributedDataParallel`) and never FSDP.

## DDP, and what FSDP changes

With DDP every rank holds the whole model, its whole gradients and the whole optimizer state;
the only communication is one all-reduce of the gradients per step. With mixed precision and
AdamW that is 16 bytes per parameter on every rank: SmolLM2-135M needs 2 GiB per rank whatever
the number of ranks, an 8B model 120 GiB, more than any GPU.

FSDP (fully sharded data parallel, here FSDP2's `fully_shard`) keeps the data parallelism (each
rank its own micro-batches, the same model) but gives each rank only 1/N of every parameter, of
its gradient and of its AdamW moments. A layer exists whole only while it computes: just before
its forward, its shards are *all-gathered* from every rank into a full copy, and the copy is freed
after; in backward it is gathered again, and the gradients are *reduce-scattered*: summed over
the ranks, each rank keeping the sum for its own rows. The optimizer then updates only the local
rows. Memory per rank falls by N for the model state; the price is communication: about three
times the model's bytes per micro-batch, not DDP's one gradient all-reduce per step.

## 1. Build and shard: [`build_sharded_model`](../fsdp/build.py), [`fsdp/shard.py`](../fsdp/shard.py)

The model is built on the meta device (shapes, no memory), checkpointed
([`fsdp/activation.py`](../fsdp/activation.py)), then `fully_shard` is applied to each decoder
layer and to the root (`shard_model`): a *unit* is the set of parameters gathered and freed
together. Each parameter becomes a DTensor holding rows of dimension 0; a rank holds ceil(rows / N)
of them, padded when N does not divide the rows. Each rank then reads only its own rows from the
safetensors files ([`load_pretrained`](../fsdp/model.py)). For SmolLM2-135M at 2 ranks:

{block(f"$ {shell('explain.py', EXPLAIN_SMOL)}")}

{block(smol_layout)}

The root unit holds the embedding table, the final norm and the output head (tied to the
embeddings, so one tensor): at 49,152 x 576 it is the largest unit, 8 times a decoder layer.
Every rank stores {model_gb} of fp32 parameters: half of the model.

## 2. One optimizer step, in order: [`train_step`](../fsdp/step.py)

The step takes the whole step's target-token count from the loader, which picks every rank's examples (the loss is divided by the
count of the *whole* step, every rank and micro-batch, so that 2 ranks compute what 1 would). Then,
for each micro-batch, forward and backward; gradients are reduce-scattered only after the last
micro-batch (`set_requires_gradient_sync`), then clipped by their global norm (an all-reduce of
the squared norms) and AdamW updates each rank's rows ([`fsdp/adamw.py`](../fsdp/adamw.py)).
Counted by [`fsdp/comm.py`](../fsdp/comm.py) during one step of 2 micro-batches, rank 0:

{block(smol_order)}

What to read in it:

- **Forward**: each unit is gathered just before its own forward starts, then freed.
- **Backward**: units are gathered again in reverse order. FSDP *prefetches*: the all-gather of
  layer i-1 is issued before the reduce-scatter of layer i, so on a GPU the next gather runs while
  this layer's gradients are reduced.
- **The root is gathered again in backward** too. This code passes `reshard_after_forward=True`
  to the root as to every unit, so the embeddings are freed after forward and gathered again when
  the loss's backward needs the head: one more all-gather of the largest unit per micro-batch, in
  exchange for not keeping it during the forward. FSDP2's own default (`None`) keeps the root
  gathered instead.
- **Accumulation**: the first micro-batch's backward has no reduce-scatter; its whole gradients
  wait on each rank (the "unsharded grads" of the memory ledger) until the last micro-batch's
  backward reduces both at once. The parameters are gathered again for every micro-batch.

The bytes, beside the theory (`expected` in [`fsdp/comm.py`](../fsdp/comm.py): forward gathers
every unit, backward again those freed after forward, once per micro-batch; one reduce-scatter of
every unit per step, in fp32):

{block(smol_totals)}

*Payload* is a collective's full size; with ring algorithms each rank sends (N-1)/N of it (2
(N-1)/N for an all-reduce): *sent per rank*. The reduce-scatter moves fp32 gradients, twice the
bytes of the bf16 all-gathers.

## 3. The same step for real: memory and time

Three real steps of the default job at 2 CPU ranks (gloo), 2 micro-batches each, with the memory ledger
([`fsdp/memory/ledger.py`](../fsdp/memory/ledger.py), PyTorch's `FSDPMemTracker`) and the collective counts on:

{block(f"$ {shell('train.py', REAL_SMOL, nproc=2)}")}

{block(chr(10).join(comm_lines))}

{block(memory_table)}

The ledger's words: *sharded params, grads, optimizer state* are the 1/N shards that live all
run long (4 + 4 + 8 bytes per parameter over N); *unsharded params* are the gathered copies (one
unit at a time, plus the prefetched one); *unsharded grads* the whole gradients waiting for their
reduce-scatter; *all-gather and reduce-scatter buffers* FSDP's staging copies for the collectives.

Time of step 2 on rank 0, the one the ledger did not slow down (`time/*` in TensorBoard), on this
machine ({cpu}): {time_split}. On CPU the collectives are
synchronous, so *comm* is the time spent inside them; on a GPU they overlap compute and the
number means only the launch. Throughput: {step2["train/tokens_per_s"]:.0f} tokens/s over both ranks,
{step2["perf/model_tflops_per_rank"] * 1e3:.1f} GFLOP/s of model FLOPs per rank (`perf/*`; MFU needs a peak,
which a CPU does not have: `metrics.peak_tflops`).

## 4. The same code for Llama-3-8B at 8 ranks, on a laptop

`explain.py` and `estimate.py` run the real build, sharding and `train_step` on fake tensors and a
fake process group ([`fsdp/fake.py`](../fsdp/fake.py)): shapes and bytes without memory or GPUs.

{block(f"$ {shell('explain.py', LLAMA)}")}

{block(llama_layout)}

{block(llama_totals)}

Per micro-batch of 2 x 2048 tokens every rank receives {gather_gib:.1f} GiB of bf16 parameters (two
gathers of the whole model, 7/8 of each from the other ranks), and once per step it sends and
receives {reduce_gib:.1f} GiB of fp32 gradients. At about 450 GB/s each way per H100 over NVLink the
gathers take about {nvlink_ms:.0f} ms per micro-batch; the micro-batch's compute, {micro_tflop:.0f} TFLOP of
model FLOPs (fsdp/flops.py), takes about {compute_ms:.0f} ms at 50% MFU, and prefetching overlaps the two.

{block(f"$ {shell('estimate.py', [*LLAMA, 'memory.fit_gib=80'])}")}

{block(llama_estimate)}
"""
    write_atomic(OUT, text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
