"""`make bench`: train.py against HF Trainer and a bare loop, interleaved, on the same work.

    make bench                                  # about 15 minutes on 2 cores
    python bench/compare.py --repeats 3 --steps 5 --out bench/results

Every run trains SmolLM2-135M on the default task's first global batches (unpacked, 8 sequences
of at most 128 tokens a step, micro-batch 2, mixed precision, lr 5e-5 with 3 warmup steps), for
the same number of optimizer steps. The runs, in one interleaved round per repeat (A B C D, A B C
D, ...) so that a drift of this shared machine's speed falls on every side alike:

    fulltune N=2   torchrun --nproc_per_node=2 train.py          (FSDP2, our loop)
    trainer N=2    torchrun --nproc_per_node=2 bench/peers.py trainer   (HF Trainer, FSDP2 via Accelerate)
    fulltune N=1   torchrun --nproc_per_node=1 train.py
    bare N=1       python bench/peers.py bare                    (HF model, autocast, torch AdamW: the limit)

Each process gets cores / N threads, so every run uses the whole machine. Tokens/s counts
non-padding tokens over the steps after the first (which pays for warm-up); peak memory is each
rank's peak RSS over the whole process. Results: bench/results/<date>.json and results.md, which
the README links.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone"]


def fulltune_argv(run_dir: Path, steps: int, model: Path | None) -> list[str]:
    argv = [
        "train.py",
        "preset=cpu-demo",
        f"run_dir={run_dir}",
        "overwrite=true",
        "data.packing=false",
        "batch.global_batch_size=8",
        "batch.micro_batch_size=2",
        f"train.max_steps={steps}",
        "eval.sets=[]",
        "eval.max_new_tokens=0",
        "export.enabled=false",
        "checkpoint.at_end=false",
    ]
    return argv + ([f"model.name_or_path={model}"] if model else [])


def fulltune_result(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
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
        "last_loss": summary["last_loss"],
        "peak_rss_bytes": peaks,
    }


def run_once(name: str, nproc: int, steps: int, work: Path, model: Path | None, cores: int) -> dict:
    """One run of one side; its per-step seconds and tokens, last loss and per-rank peak RSS."""
    out = work / f"{name.replace(' ', '-').replace('=', '')}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc)), "PYTHONUNBUFFERED": "1"}
    launcher = [*TORCHRUN, f"--nproc_per_node={nproc}"]
    peer_args = ["--steps", str(steps), "--out", str(out)] + (["--model", str(model)] if model else [])
    if name.startswith("fulltune"):
        run_dir = work / name.replace(" ", "-").replace("=", "")
        command = [*launcher, *fulltune_argv(run_dir, steps, model)]
    elif name.startswith("trainer"):
        command = [*launcher, "bench/peers.py", "trainer", *peer_args]
    else:
        command = [PY, "bench/peers.py", "bare", *peer_args]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = fulltune_result(run_dir) if name.startswith("fulltune") else json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - start
    seconds, tokens = result["seconds"][1:], result["tokens"][1:]  # the first step pays for warm-up
    result["tokens_per_s"] = sum(tokens) / sum(seconds)
    result["peak_rss_per_rank"] = max(result["peak_rss_bytes"])
    return result


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def table(results: dict, comparisons: list[tuple[str, str]]) -> str:
    """Markdown: each pair, tokens/s and peak RSS per rank (median, min-max), the ratios, the last losses."""
    lines = [
        "| ours | theirs | tokens/s ours | tokens/s theirs | ratio | peak RSS/rank ours (GiB) | theirs | ratio | last loss ours / theirs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def cell(s: dict, scale: float = 1.0, digits: int = 1) -> str:
        return (
            f"{s['median'] / scale:.{digits}f} ({s['min'] / scale:.{digits}f}-{s['max'] / scale:.{digits}f})"
        )

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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--model", type=Path, default=None, help="another HF folder (the harness test)")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench", help="the runs' own files")
    args = parser.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    start = time.perf_counter()
    for repeat in range(args.repeats):
        for side in SIDES:  # interleaved: A B C D, A B C D, ...
            nproc = int(side.rsplit("=", 1)[1])
            result = run_once(side, nproc, args.steps, work, args.model, args.cores)
            runs[side].append(result)
            print(
                f"[bench] repeat {repeat + 1}/{args.repeats} {side}: {result['tokens_per_s']:.1f} tokens/s, "
                f"peak RSS/rank {result['peak_rss_per_rank'] / 2**30:.2f} GiB, last loss {result['last_loss']:.4f}",
                flush=True,
            )
    results = {
        side: {
            "tokens_per_s": summarize([r["tokens_per_s"] for r in rs]),
            "peak_rss": summarize([r["peak_rss_per_rank"] for r in rs]),
            "last_loss": summarize([r["last_loss"] for r in rs]),
            "runs": rs,
        }
        for side, rs in runs.items()
    }
    date = time.strftime("%Y-%m-%d")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}, CPU, gloo"
    )
    record = {
        "date": date,
        "machine": machine,
        "steps": args.steps,
        "repeats": args.repeats,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{date}.json").write_text(json.dumps(record, indent=1))
    text = (
        f"# make bench, {date}\n\n{machine}; {args.model.name if args.model else 'SmolLM2-135M'}, {args.steps} optimizer steps of 8 sequences (<= 128 "
        f"tokens, micro-batch 2), mixed precision; median (min-max) of {args.repeats} interleaved repeats; "
        f"tokens/s over steps 2-{args.steps}.\n\n" + table(results, COMPARISONS)
    )
    (args.out / "results.md").write_text(text)
    print(text)
    print(f"[bench] {time.perf_counter() - start:.0f} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
