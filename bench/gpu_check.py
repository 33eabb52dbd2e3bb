"""The GPU check: what the CPU tests cannot run, on one GPU, in under 5 minutes; one PASS/FAIL line each.

    python bench/gpu_check.py [--out DIR]     on a machine with a GPU (NCCL, CUDA memory, offload)
    python bench/gpu_check.py --dry           the same runs and checks on CPU (gloo, no offload): the
                                              script's own logic, before a GPU is spent on it

The model is the tiny preset's SmolLM2 config, widened (hidden 1024, 8 layers: about 170M parameters,
random init), so host and device bytes are far apart; every run is train.py as users start it.

  nccl offload     torchrun, fsdp.cpu_offload=true: the process group is cuda:nccl,cpu:gloo (the
                   gradient norm's all-reduce runs on host shards), 6 steps, finite losses
  offload memory   memory.json: sharded params, sharded grads and optimizer state in host bytes, the
                   gathered ones in device bytes, each beside the analytic model's
  offload parity   the same run without offload (plain python with LOCAL_RANK=3 and one visible
                   GPU: the device index is taken modulo the visible GPUs) logs the same losses
  resume           the offloaded run killed as step 5 starts (checkpoints every 2 steps), then
                   resume=auto: steps 5 and 6 log the uninterrupted run's losses; the checkpoint's
                   RNG state is this rank's own GPU's only
  export           the resumed run's model folder loads in transformers, on the GPU, and its loss on
                   a training sequence is finite and close to the run's last
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from durable import write_atomic, write_json  # noqa: E402
from fsdp.checkpoint import load_rng_file  # noqa: E402
from fsdp.metrics import read_metrics  # noqa: E402

WIDE = [
    "model.config_overrides.hidden_size=1024",
    "model.config_overrides.intermediate_size=4096",
    "model.config_overrides.num_hidden_layers=8",
    "model.config_overrides.num_attention_heads=16",
    "model.config_overrides.num_key_value_heads=4",
    "model.config_overrides.head_dim=64",
]
STEPS = 6


def model_folder() -> str:
    """The tokenizer and config only (random init): carried as .gpu/tiny-model where the default
    model's 260 MB of weights cannot travel."""
    carried = REPO / ".gpu" / "tiny-model"
    return str(carried if carried.is_dir() else REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")


def argv(run_dir: Path, dry: bool, *more: str) -> list[str]:
    common = [
        "preset=tiny",
        f"model.name_or_path={model_folder()}",
        f"run_dir={run_dir}",
        f"train.max_steps={STEPS}",
        "batch.global_batch_size=8",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=null",
        "export.dtype=fp32",
        "eval.max_new_tokens=0",
    ]
    carried = REPO / ".gpu" / "tokenized"  # tokenized here: the GPU machine lacks `datasets`
    if carried.is_dir():
        common.append(f"data.cache_dir={carried}")
    if dry:  # the tiny model as it is, fp32 (CPUs without native bf16 emulate it)
        return [*common, "device=cpu", "precision=fp32", *more]
    return [*common, *WIDE, "device=cuda", "precision=mixed", "batch.max_seq_length=512", *more]


def launch(
    log: Path, args: list[str], env: dict | None = None, torchrun: bool = True
) -> subprocess.CompletedProcess:
    """train.py under torchrun (one rank) or plain python; its whole output is kept in `log`."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    command = [*(launcher if torchrun else [sys.executable]), "train.py", *args]
    merged = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(command, cwd=REPO, env=merged, capture_output=True, text=True, timeout=300)
    log.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(log, f"$ {' '.join(command)}\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


class Checks:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.results.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name:<16} {detail}", flush=True)
        return ok


def losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    return [r["train/loss"] for r in rows if "train/loss" in r]


def tail(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-600:]


def close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) > 0 and all(
        abs(x - y) <= rel * max(abs(y), 1e-6) for x, y in zip(a, b, strict=True)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU and gloo, no offload: the script's logic")
    parser.add_argument("--out", default=os.environ.get("OUT", str(REPO / "runs" / "gpu-check")))
    args = parser.parse_args()
    out = Path(args.out)
    work = out / "runs"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out / "logs", ignore_errors=True)
    import torch

    dry = args.dry
    if not dry and not torch.cuda.is_available():
        print("FAIL  no GPU visible (use --dry on CPU)")
        return 1
    print(f"torch {torch.__version__}; " + (torch.cuda.get_device_name(0) if not dry else "CPU (dry run)"))
    checks, start = Checks(), time.perf_counter()
    offload = [] if dry else ["fsdp.cpu_offload=true", "memory.track=true"]

    # 1. NCCL (+ gloo for the host) with offload, uninterrupted: the reference of the others.
    full = work / "offload"
    result = launch(out / "logs" / "offload.txt", argv(full, dry, *offload))
    reference = losses(full)
    backend = "gloo" if dry else "cuda:nccl,cpu:gloo"
    checks.check(
        "nccl offload",
        result.returncode == 0
        and f"({backend})" in result.stdout
        and len(reference) == STEPS
        and all(math.isfinite(x) for x in reference),
        f"exit {result.returncode}, losses {[round(x, 4) for x in reference]}"
        + ("" if result.returncode == 0 else f": {tail(result)}"),
    )

    # 2. Host and device bytes, measured beside predicted.
    memory_file = full / "memory.json"
    if dry:
        checks.check("offload memory", True, "(dry: no offload on CPU)")
    else:
        record = json.loads(memory_file.read_text()) if memory_file.is_file() else {}
        checks.check("offload memory", *offload_memory(record))

    # 3. Without offload, through LOCAL_RANK=3 on one visible GPU: the same losses.
    plain = work / "plain"
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    if not dry:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    result = launch(out / "logs" / "plain.txt", argv(plain, dry), env=env, torchrun=False)
    mine = losses(plain)
    checks.check(
        "offload parity",
        result.returncode == 0 and close(mine, reference, 1e-3 if not dry else 1e-5),
        f"exit {result.returncode}, losses {[round(x, 4) for x in mine]}"
        + ("" if result.returncode == 0 else f": {tail(result)}"),
    )

    # 4. Killed as step 5 starts, then resume=auto.
    killed = work / "resumed"
    fault = {"FULLTUNE_FAULT": "action=kill,at=step,step=5"}
    first = launch(out / "logs" / "killed.txt", argv(killed, dry, *offload, "resume=auto"), env=fault)
    second = launch(out / "logs" / "resumed.txt", argv(killed, dry, *offload, "resume=auto"))
    resumed = losses(killed)
    rng_file = killed / "checkpoints" / "step-00000004" / "rank-0.pt"
    rng = load_rng_file(rng_file) if rng_file.is_file() else {}
    own_gpu = dry or (isinstance(rng.get("cuda"), torch.Tensor) and rng["cuda"].dim() == 1)
    checks.check(
        "resume",
        first.returncode != 0
        and second.returncode == 0
        and "(step 4, saved by 1 ranks)" in second.stdout
        and close(resumed[4:], reference[4:], 1e-3 if not dry else 1e-6)
        and own_gpu,
        f"first exit {first.returncode}, second exit {second.returncode}, steps 5-6 "
        f"{[round(x, 4) for x in resumed[4:]]} vs {[round(x, 4) for x in reference[4:]]}, "
        f"RNG of this GPU only: {own_gpu}" + ("" if second.returncode == 0 else f": {tail(second)}"),
    )

    # 5. The export loads and computes.
    if (killed / "model").is_dir():
        checks.check("export", *export_loads(killed / "model", "cpu" if dry else "cuda", resumed))
    else:
        checks.check("export", False, f"no {killed / 'model'}")

    failed = [name for name, ok, _ in checks.results if not ok]
    seconds = time.perf_counter() - start
    summary = {"torch": torch.__version__, "dry": dry, "seconds": round(seconds, 1)}
    summary["checks"] = [{"name": n, "pass": ok, "detail": d} for n, ok, d in checks.results]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu-check.json", summary)
    print(f"{'ALL PASS' if not failed else 'FAILED: ' + ', '.join(failed)} in {seconds:.0f} s", flush=True)
    return 1 if failed else 0


def offload_memory(record: dict) -> tuple[bool, str]:
    """Measured (the ledger of step 1) host and device bytes, and the analytic model's."""
    ranks = record.get("ranks") or [{}]
    measured = next(iter(ranks[0].values()), {})
    analytic = record.get("analytic", {})
    return bool(measured) and bool(analytic), json.dumps({"measured": measured, "analytic": analytic})[:2000]


def export_loads(folder: Path, device: str, run_losses: list[float]) -> tuple[bool, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # any failure to load is the check failing
        return False, f"{folder}: {type(err).__name__}: {err}"[:600]
    record = json.loads((REPO / "data" / "samples" / "unit-conversions.jsonl").read_text().splitlines()[0])
    ids = tokenizer(record["prompt"] + " " + record["response"], return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    ok = math.isfinite(loss) and bool(run_losses) and abs(loss - run_losses[-1]) < 2.0
    return (
        ok,
        f"{folder} loads on {device}; loss on a training record {loss:.4f} (run's last {run_losses[-1:]})",
    )


if __name__ == "__main__":
    sys.exit(main())
