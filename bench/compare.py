"""`make bench`: train.py against HF Trainer and a bare loop, interleaved, on the same work.

    make bench                                  # about 13 minutes on 2 cores (fp32, AVX2)
    python bench/compare.py --repeats 3 --steps 5 --out bench/results
    python bench/compare.py --precision mixed   # force bf16 compute, even where it is emulated
    python bench/compare.py --set optim.impl=fused --set fsdp.split_root=true   # fulltune's levers

Every run trains SmolLM2-135M on the default task's first global batches (unpacked, 8 sequences
of at most 128 tokens a step, micro-batch 2, lr 5e-5 with 3 warmup steps), for the same number of
optimizer steps, at one precision on every side: `--precision auto` (the default) takes what
train.py's `precision=auto` takes on this CPU (fsdp/precision.py: mixed where bf16 is native,
AVX-512 BF16 or AMX; fp32 where it is emulated, as on AVX2), so the ratios compare like with like.
mixed: train.py precision=mixed, the peers under bf16 autocast (Trainer bf16=True); bf16: bf16
weights and AdamW state everywhere, no autocast; fp32: fp32 everywhere. The runs, in one
interleaved round per repeat (A B C D, A B C D, ...) so that a drift of this shared machine's speed
falls on every side alike:

    fulltune N=2   torchrun --nproc_per_node=2 train.py          (FSDP2, our loop)
    trainer N=2    torchrun --nproc_per_node=2 bench/peers.py trainer   (HF Trainer, FSDP2 via Accelerate)
    fulltune N=1   torchrun --nproc_per_node=1 train.py
    bare N=1       python bench/peers.py bare                    (HF model, torch AdamW: the limit)

`--set key=value` (repeatable) adds train.py overrides to the fulltune sides only (its levers:
compile, optim.impl, fsdp.*; bench/levers.py measures each alone). Each process gets cores / N
threads, so every run uses the whole machine. Tokens/s counts non-padding tokens over the steps
after the first (which pays for warm-up), leaving out any step that compiled (compile=true: the first
and each new input shape; their seconds are recorded apart); peak memory is each rank's peak RSS
over the whole process. Results: bench/results/<date>.json and results.md (naming
the CPU, its capability, the precision and why, and the overrides), which docs/speed.md links.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from durable import write_atomic, write_json  # noqa: E402 (after the path is set)
from fsdp.metrics import read_metrics  # noqa: E402 (after the path is set)

PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone"]
PRECISIONS = ("auto", "mixed", "bf16", "fp32")


class RunFailed(RuntimeError):
    """One run exited non-zero; the message ends with its stderr's tail."""


def slug(name: str) -> str:
    """A run's name as a file name: 'fulltune N=2' -> 'fulltune-N2'."""
    return "".join(c for c in name.replace(" ", "-") if c.isalnum() or c in "-_.")


def fulltune_argv(
    run_dir: Path, steps: int, model: Path | None, precision: str = "mixed", overrides: tuple[str, ...] = ()
) -> list[str]:
    """train.py's arguments for make bench's work; `overrides` last, so they win."""
    argv = [
        "train.py",
        "preset=cpu-demo",
        f"run_dir={run_dir}",
        "overwrite=true",
        f"precision={precision}",
        "data.packing=false",
        "batch.global_batch_size=8",
        "batch.micro_batch_size=2",
        f"train.max_steps={steps}",
        "eval.sets=[]",
        "eval.max_new_tokens=0",
        "export.enabled=false",
        "checkpoint.at_end=false",
    ]
    return argv + ([f"model.name_or_path={model}"] if model else []) + list(overrides)


def fulltune_result(run_dir: Path) -> dict:
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "train/loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    peaks = [
        max(a, b)
        for a, b in zip(
            summary["peak_rss_bytes_per_rank"], summary["load_peak_rss_bytes_per_rank"], strict=True
        )
    ]
    return {
        "seconds": [r["time/step_s"] for r in steps],
        "tokens": [r["train/tokens_per_s"] * r["time/step_s"] for r in steps],
        "compile_seconds": [r.get("time/compile_s", 0.0) for r in steps],  # compile=true: where it compiled
        "last_loss": summary["last_loss"],
        "peak_rss_bytes": peaks,
    }


def launch(name: str, command: list[str], nproc: int, cores: int, extra_env: dict | None = None) -> float:
    """Run one command with cores / nproc threads per process; its wall seconds, or RunFailed."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, cores // nproc)),
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RunFailed(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def measured(result: dict, wall_seconds: float) -> dict:
    """A run's per-step record with its figures: tokens/s over the timed steps, the first step's
    seconds, the seconds spent compiling (compile=true), the peak RSS per rank.

    The timed steps are those after the first (which pays for warm-up) that did not compile: under
    compile=true, torch.compile runs in the first step and again at a new input shape, a one-time
    cost reported apart (compile_s), not in the throughput. Were every step to compile, all after
    the first are timed."""
    seconds, tokens = result["seconds"], result["tokens"]
    compiling = result.get("compile_seconds") or [0.0] * len(seconds)
    later = range(1, len(seconds))
    timed = [i for i in later if compiling[i] == 0] or list(later)
    result["wall_seconds"] = wall_seconds
    result["timed_steps"] = [i + 1 for i in timed]  # 1-based, as train.py numbers them
    result["tokens_per_s"] = sum(tokens[i] for i in timed) / sum(seconds[i] for i in timed)
    result["first_step_s"] = seconds[0]
    result["compile_s"] = sum(compiling)
    result["peak_rss_per_rank"] = max(result["peak_rss_bytes"])
    return result


def run_fulltune(
    name: str,
    nproc: int,
    steps: int,
    work: Path,
    model: Path | None,
    cores: int,
    precision: str,
    overrides: tuple[str, ...] = (),
) -> dict:
    """train.py under torchrun on make bench's work. A fresh inductor cache for each run, so that
    under compile=true every repeat's first step pays the whole compile, as a first run does."""
    run_dir = work / slug(name)
    cache = work / f"{slug(name)}.inductor-cache"
    shutil.rmtree(cache, ignore_errors=True)
    command = [
        *TORCHRUN,
        f"--nproc_per_node={nproc}",
        *fulltune_argv(run_dir, steps, model, precision, overrides),
    ]
    wall = launch(name, command, nproc, cores, {"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    shutil.rmtree(cache, ignore_errors=True)
    return measured(fulltune_result(run_dir), wall)


def run_once(
    name: str,
    nproc: int,
    steps: int,
    work: Path,
    model: Path | None,
    cores: int,
    precision: str = "mixed",
    overrides: tuple[str, ...] = (),
) -> dict:
    """One run of one side; its per-step seconds and tokens, last loss and per-rank peak RSS."""
    if name.startswith("fulltune"):
        return run_fulltune(name, nproc, steps, work, model, cores, precision, overrides)
    out = work / f"{slug(name)}.json"
    peer_args = ["--steps", str(steps), "--out", str(out), "--precision", precision]
    peer_args += ["--model", str(model)] if model else []
    if name.startswith("trainer"):
        command = [*TORCHRUN, f"--nproc_per_node={nproc}", "bench/peers.py", "trainer", *peer_args]
    else:
        command = [PY, "bench/peers.py", "bare", *peer_args]
    wall = launch(name, command, nproc, cores)
    return measured(json.loads(out.read_text()), wall)


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def aggregate(runs: list[dict]) -> dict:
    """One side's repeats: tokens/s, peak RSS per rank, last loss and first step (median, min, max)."""
    return {
        "tokens_per_s": summarize([r["tokens_per_s"] for r in runs]),
        "peak_rss": summarize([r["peak_rss_per_rank"] for r in runs]),
        "last_loss": summarize([r["last_loss"] for r in runs]),
        "first_step_s": summarize([r["first_step_s"] for r in runs]),
        "compile_s": summarize([r["compile_s"] for r in runs]),
        "runs": runs,
    }


def cell(s: dict, scale: float = 1.0, digits: int = 1) -> str:
    """median (min-max)"""
    return f"{s['median'] / scale:.{digits}f} ({s['min'] / scale:.{digits}f}-{s['max'] / scale:.{digits}f})"


def host(requested: str) -> dict:
    """This machine for the record: the CPU (name, torch's capability, native bf16 or not), the
    precision `requested` resolves to here and why, the core count and torch."""
    import torch

    from fsdp.precision import choose_precision, this_cpu

    cpu = this_cpu()
    used, reason = choose_precision(requested, "cpu")
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU, gloo",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cpu": {**dataclasses.asdict(cpu), "describe": cpu.describe()},
        "precision": {"requested": requested, "used": used, "reason": reason},
    }


def host_lines(record: dict) -> str:
    """The markdown lines naming the CPU and the precision, for results.md and levers.md."""
    return (
        f"CPU: {record['cpu']['describe']}; {record['cores']} cores, torch {record['torch']}, gloo.\n\n"
        f"Precision on every run: **{record['precision']['used']}**. Why: {record['precision']['reason']}.\n\n"
    )


def table(results: dict, comparisons: list[tuple[str, str]]) -> str:
    """Markdown: each pair, tokens/s and peak RSS per rank (median, min-max), the ratios, the last losses."""
    lines = [
        "| ours | theirs | tokens/s ours | tokens/s theirs | ratio | peak RSS/rank ours (GiB) | theirs | ratio | last loss ours / theirs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for ours, theirs in comparisons:
        a, b = results[ours], results[theirs]
        lines.append(
            f"| {ours} | {theirs} | {cell(a['tokens_per_s'])} | {cell(b['tokens_per_s'])} | "
            f"{a['tokens_per_s']['median'] / b['tokens_per_s']['median']:.2f} | {cell(a['peak_rss'], 2**30, 2)} | "
            f"{cell(b['peak_rss'], 2**30, 2)} | {a['peak_rss']['median'] / b['peak_rss']['median']:.2f} | "
            f"{a['last_loss']['median']:.4f} / {b['last_loss']['median']:.4f} |"
        )
    return "\n".join(lines) + "\n"


SIDES = ["fulltune N=2", "trainer N=2", "fulltune N=1", "bare N=1"]
COMPARISONS = [
    ("fulltune N=2", "trainer N=2"),
    ("fulltune N=1", "bare N=1"),
    ("fulltune N=2", "fulltune N=1"),
]


def common_arguments(parser: argparse.ArgumentParser, work: Path) -> None:
    """The options compare.py and levers.py share."""
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--model", type=Path, default=None, help="another HF folder (the harness test)")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--work", type=Path, default=work, help="the runs' own files")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="every run's precision; auto: mixed where this CPU has native bf16, fp32 where it is emulated",
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    common_arguments(parser, REPO / "runs" / "bench")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a train.py override for the fulltune sides (repeatable), e.g. --set optim.impl=fused",
    )
    parser.add_argument(
        "--sides", nargs="+", choices=SIDES, default=SIDES, help="a subset (the harness test)"
    )
    args = parser.parse_args(argv)
    if any("=" not in o for o in args.overrides):
        parser.error(f"--set takes key=value, not {[o for o in args.overrides if '=' not in o]}")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    machine = host(args.precision)
    precision = machine["precision"]["used"]
    print(f"[bench] {machine['cpu']['describe']}; precision {machine['precision']['reason']}", flush=True)
    overrides = tuple(args.overrides)
    sides = [side for side in SIDES if side in args.sides]
    comparisons = [(a, b) for a, b in COMPARISONS if a in sides and b in sides]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    start = time.perf_counter()
    for repeat in range(args.repeats):
        for side in sides:  # interleaved: A B C D, A B C D, ...
            nproc = int(side.rsplit("=", 1)[1])
            try:
                result = run_once(side, nproc, args.steps, work, args.model, args.cores, precision, overrides)
            except RunFailed as failed:
                raise SystemExit(str(failed)) from None
            runs[side].append(result)
            print(
                f"[bench] repeat {repeat + 1}/{args.repeats} {side}: {result['tokens_per_s']:.1f} tokens/s, "
                f"peak RSS/rank {result['peak_rss_per_rank'] / 2**30:.2f} GiB, last loss {result['last_loss']:.4f}",
                flush=True,
            )
    results = {side: aggregate(rs) for side, rs in runs.items()}
    date = time.strftime("%Y-%m-%d")
    record = {
        "date": date,
        **machine,
        "overrides": list(overrides),
        "steps": args.steps,
        "repeats": args.repeats,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{date}.json", record)
    levers = (
        f"fulltune sides with {' '.join(overrides)} (the peers: their defaults).\n\n"
        if overrides
        else "fulltune sides with train.py's defaults.\n\n"
    )
    text = (
        f"# make bench, {date}\n\n"
        + host_lines(record)
        + levers
        + f"{args.model.name if args.model else 'SmolLM2-135M'}, {args.steps} optimizer steps of 8 sequences "
        f"(<= 128 tokens, micro-batch 2), {precision} precision; median (min-max) of {args.repeats} "
        f"interleaved repeats; tokens/s over steps 2-{args.steps} (leaving out any that compiled).\n\n"
        + table(results, comparisons)
    )
    write_atomic(args.out / "results.md", text)
    print(text)
    print(f"[bench] {time.perf_counter() - start:.0f} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
