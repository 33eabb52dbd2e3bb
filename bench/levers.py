"""The before/after table of each lever: train.py's baseline, then each lever alone, then all of them.

    python bench/levers.py                              # N=2, 2 repeats of 5 steps, fp32 or mixed (auto)
    python bench/levers.py --nproc 2 1 --repeats 3      # also at N=1
    python bench/levers.py --levers baseline optim-fused compile   # a subset

The same work as make bench's fulltune sides (bench/compare.py: SmolLM2-135M, the default task's
first global batches, unpacked, 8 sequences of at most 128 tokens a step, micro-batch 2, at the
precision `auto` picks on this CPU or --precision), run by the same code, once per setting:

    baseline         train.py's defaults
    split-root       fsdp.split_root=true        (torchtitan's units: embeddings alone, norm + head kept gathered)
    reduce-bf16      fsdp.reduce_dtype=bf16      (gradients reduce-scattered in bf16: half the bytes)
    prefetch-1       fsdp.explicit_prefetch=1    (the next unit's all-gather issued explicitly)
    compile          compile=true                (torch.compile per decoder layer)
    optim-foreach    optim.impl=foreach          (multi-tensor AdamW)
    optim-fused      optim.impl=fused            (torch's fused AdamW)
    all              every lever above together, AdamW fused

Interleaved: each repeat runs every setting once, in order (A B C ..., A B C ...), so a drift of
the machine's speed falls on every setting alike. Per setting: tokens/s over the steps after the
first (median, min-max) and its ratio to the baseline at the same N, peak RSS per rank and its
ratio, the last loss, the first step's seconds and the seconds spent compiling: compile's one-time
cost (each run gets a fresh inductor cache, so every repeat compiles from scratch; torch.compile
runs in the first step and again at each new input shape, and those steps are left out of tokens/s). A setting whose run
fails is reported as failed and not run again; the others go on. Results: levers.md and
levers-<date>.json in --out (bench/results).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import REPO, RunFailed, aggregate, cell, common_arguments, host, host_lines, run_fulltune

from durable import write_atomic, write_json

LEVERS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "split-root": ("fsdp.split_root=true",),
    "reduce-bf16": ("fsdp.reduce_dtype=bf16",),
    "prefetch-1": ("fsdp.explicit_prefetch=1",),
    "compile": ("compile=true",),
    "optim-foreach": ("optim.impl=foreach",),
    "optim-fused": ("optim.impl=fused",),
}
LEVERS["all"] = tuple(o for lever, sets in LEVERS.items() if lever != "optim-foreach" for o in sets)  # fused


def row_name(lever: str, nproc: int) -> str:
    return f"{lever} N={nproc}"


def rows(results: dict, settings: list[str], nprocs: list[int]) -> dict:
    """Each setting's aggregate with its ratios to the baseline at the same N (where both ran)."""
    out = {}
    for n in nprocs:
        base = results.get(row_name("baseline", n))
        for lever in settings:
            r = results.get(row_name(lever, n))
            if r is None or "failed" in r or base is None or "failed" in base:
                out[row_name(lever, n)] = r
                continue
            r["ratio_tokens_per_s"] = r["tokens_per_s"]["median"] / base["tokens_per_s"]["median"]
            r["ratio_peak_rss"] = r["peak_rss"]["median"] / base["peak_rss"]["median"]
            out[row_name(lever, n)] = r
    return out


def table(results: dict, settings: list[str], nprocs: list[int]) -> str:
    """Markdown, one row per setting and N."""
    lines = [
        "| setting | N | overrides | tokens/s | ratio | peak RSS/rank (GiB) | ratio | last loss | first step (s) "
        "| compiling (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in nprocs:
        for lever in settings:
            r = results.get(row_name(lever, n))
            overrides = " ".join(LEVERS[lever]) or "(train.py's defaults)"
            if r is None:
                continue
            if "failed" in r:
                lines.append(f"| {lever} | {n} | {overrides} | failed: {r['failed']} | | | | | | |")
                continue
            ratio = f"{r['ratio_tokens_per_s']:.2f}" if "ratio_tokens_per_s" in r else "-"
            ratio_rss = f"{r['ratio_peak_rss']:.2f}" if "ratio_peak_rss" in r else "-"
            lines.append(
                f"| {lever} | {n} | {overrides} | {cell(r['tokens_per_s'])} | {ratio} | "
                f"{cell(r['peak_rss'], 2**30, 2)} | {ratio_rss} | {r['last_loss']['median']:.4f} | "
                f"{cell(r['first_step_s'], 1.0, 2)} | {r['compile_s']['median']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def failure_line(error: RunFailed) -> str:
    """The last informative line of a failed run's stderr, for a table cell."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["?"])[-1].replace("|", "/")[:160]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    common_arguments(parser, REPO / "runs" / "bench-levers")
    parser.add_argument("--nproc", type=int, nargs="+", default=[2], help="ranks: 2, or 2 1")
    parser.add_argument(
        "--levers",
        nargs="+",
        default=list(LEVERS),
        choices=list(LEVERS),
        help="the settings to run (baseline is added when missing)",
    )
    args = parser.parse_args(argv)
    settings = ["baseline"] + [lever for lever in dict.fromkeys(args.levers) if lever != "baseline"]
    args.work.mkdir(parents=True, exist_ok=True)
    machine = host(args.precision)
    precision = machine["precision"]["used"]
    print(f"[levers] {machine['cpu']['describe']}; precision {machine['precision']['reason']}", flush=True)
    runs: dict[str, list[dict]] = {row_name(lever, n): [] for lever in settings for n in args.nproc}
    failed: dict[str, str] = {}
    start = time.perf_counter()
    for repeat in range(args.repeats):
        for lever in settings:  # interleaved: A B C ..., A B C ...
            for n in args.nproc:
                name = row_name(lever, n)
                if name in failed:
                    continue
                try:
                    result = run_fulltune(
                        f"fulltune {name}",
                        n,
                        args.steps,
                        args.work,
                        args.model,
                        args.cores,
                        precision,
                        LEVERS[lever],
                    )
                except RunFailed as error:
                    failed[name] = failure_line(error)
                    print(f"[levers] {name} FAILED, not run again:\n{str(error)[-2000:]}", flush=True)
                    continue
                runs[name].append(result)
                print(
                    f"[levers] repeat {repeat + 1}/{args.repeats} {name}: {result['tokens_per_s']:.1f} tokens/s, "
                    f"first step {result['first_step_s']:.1f} s, peak RSS/rank "
                    f"{result['peak_rss_per_rank'] / 2**30:.2f} GiB, last loss {result['last_loss']:.4f}",
                    flush=True,
                )
    results = {
        name: ({"failed": failed[name], "runs": rs} if name in failed else aggregate(rs))
        for name, rs in runs.items()
        if rs or name in failed
    }
    results = rows(results, settings, args.nproc)
    date = time.strftime("%Y-%m-%d")
    record = {
        "date": date,
        **machine,
        "steps": args.steps,
        "repeats": args.repeats,
        "levers": {lever: list(LEVERS[lever]) for lever in settings},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"levers-{date}.json", record)
    text = (
        f"# train.py's levers, {date}\n\n"
        + host_lines(record)
        + f"{args.model.name if args.model else 'SmolLM2-135M'}, {args.steps} optimizer steps of 8 sequences "
        f"(<= 128 tokens, micro-batch 2), {precision} precision, make bench's work; median (min-max) of "
        f"{args.repeats} interleaved repeats; tokens/s over steps 2-{args.steps}, leaving out the steps that "
        "compiled; ratios to the baseline at the same N; first step: its seconds; compiling: the seconds "
        "torch.compile took over the run (compile's one-time cost, from a fresh cache each run: the first "
        "step and each new input shape).\n\n" + table(results, settings, args.nproc)
    )
    write_atomic(args.out / "levers.md", text)
    print(text)
    print(f"[levers] {time.perf_counter() - start:.0f} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
