"""The forgetting experiment: the usual defences against forgetting, each switched off once, and
forgetting measured three ways.

    make forgetting                      # under 30 minutes on 2 cores; writes docs/forgetting/
    python -m experiments.forgetting --nproc 2 --out docs/forgetting

Every setting is `train.py preset=cpu-demo` (SmolLM2-135M, the medical-terminology task, 2 CPU
ranks) on the same seeded subset of domain examples, evaluated on the same held-out examples
before and after. The three defences of the textbook: a low learning rate, few epochs, general
data mixed in; and one practitioners add, self-replay. One or two things change per row against
the baseline (general fraction 0.2 of Wikipedia, the demo's learning rate, one epoch):

    no mixing          data.general.fraction=0        the anchor removed
    lr x10             optim.lr ten times higher       the gentle nudge made a push
    3 epochs           train.epochs=3                  the same data seen three times
    lr x10, no mixing  both                            does the anchor hold when the push comes?
    self-replay        the model's own answers to 64 general questions mixed in at 0.2, instead
                       of Wikipedia (experiments/self_replay.py builds them first)

What is measured per setting, from the run's eval.json: the change of the domain held-out loss
(negative: learned), and three measures of what was forgotten (positive: forgot): the general
held-out loss (held-out Wikipedia articles: the distribution that is mixed in), the unseen loss
(the Python reference's topics: never trained on by any setting) and the own-answers drift (the
loss on the model's answers to 32 other general questions, kept before training). Written:
results.json, table.md and forgetting.png (matplotlib) in --out.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from durable import write_atomic, write_json

REPO = Path(__file__).resolve().parent.parent
BASE_LR = 5e-5  # conf/preset/cpu-demo.yaml
REPLAY = REPO / ".cache" / "data" / "self-replay"

# name: (overrides, what it tests)
SETTINGS = {
    "baseline": ([], "general fraction 0.2, lr 5e-5, 1 epoch"),
    "no mixing": (["data.general.fraction=0"], "general fraction 0"),
    "lr x10": ([f"optim.lr={BASE_LR * 10:g}"], "lr 5e-4"),
    "3 epochs": (["train.epochs=3"], "3 epochs"),
    "lr x10, no mixing": (
        [f"optim.lr={BASE_LR * 10:g}", "data.general.fraction=0"],
        "lr 5e-4, general fraction 0",
    ),
    "self-replay": (
        [f"data.general.path={REPLAY / 'train.jsonl'}", "data.general.format=prompt_response"],
        "own answers mixed in at 0.2 instead of Wikipedia",
    ),
}
# What each setting is measured on: eval.json's sets, and the names the table and plot give them.
MEASURES = {
    "domain": "domain",
    "general": "Wikipedia (mixed-in kind)",
    "unseen": "Python docs (never trained on)",
    "own_answers": "own answers (drift)",
}
# The budget (under 30 minutes on 2 cores): a seeded subset of 64 domain examples (each setting
# sees the same ones), no checkpoint, no export, no generations (the default job shows those); 32
# examples of each held-out set, and the demo's 32 own-answer questions. The pretrained model's
# step-0 evaluation is the same for every setting: the first computes it, the others read it
# (eval.cache_dir).
COMMON = [
    "preset=cpu-demo",
    "overwrite=true",
    "data.max_train_examples=64",
    "train.max_steps=null",
    "checkpoint.at_end=false",
    "export.enabled=false",
    "eval.max_new_tokens=0",
    "eval.max_examples=32",
]


def run_setting(name: str, overrides: list[str], nproc: int, runs_dir: Path, extra: list[str]) -> dict:
    """One train.py run under torchrun; its eval.json and summary.json as one row."""
    run_dir = runs_dir / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip(
        "-"
    )  # "lr x10, no mixing" -> lr-x10-no-mixing
    argv = [*COMMON, f"name=forgetting-{run_dir.name}", f"run_dir={run_dir}", *overrides, *extra]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    start = time.perf_counter()
    done = subprocess.run([*command, "train.py", *argv], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: train.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads((run_dir / "eval.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "setting": name,
        "overrides": overrides,
        "steps": summary["steps"],
        "wall_seconds": round(time.perf_counter() - start, 1),
        **{name: report["sets"][name] for name in MEASURES},
        "domain_gain": report["domain_gain"],
        "forgetting": report["forgetting"],
    }


def table(rows: list[dict]) -> str:
    """The markdown table: each measure's held-out loss before (one row: the same for every setting)
    and after each setting, with its change."""
    head = " | ".join(MEASURES.values())
    lines = [f"| setting | steps | {head} |", "|---|---:|" + "---:|" * len(MEASURES)]
    before = " | ".join(f"{rows[0][name]['loss_before']:.4f}" for name in MEASURES)
    lines.append(f"| before fine-tuning | 0 | {before} |")
    for r in rows:
        after = " | ".join(f"{r[name]['loss_after']:.4f} ({r[name]['change']:+.4f})" for name in MEASURES)
        lines.append(f"| {r['setting']} | {r['steps']} | {after} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Per setting, the change of each measure: the domain's (down: learned) beside the three of
    forgetting (up: forgot)."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.6, 4.8), dpi=120)
    width = 0.8 / len(MEASURES)
    for k, (name, label) in enumerate(MEASURES.items()):
        xs = [i + (k - (len(MEASURES) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[name]["change"] for r in rows], width, label=label)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r["setting"] for r in rows], rotation=15)
    ax.set_ylabel("held-out loss change, after - before (nats/token)")
    ax.set_title("SmolLM2-135M on medical terms: learned (domain, down) vs forgotten (up)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".")))
    plt.close(fig)


def write_results(rows: list[dict], out: Path, machine: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {"machine": machine, "settings": rows}, indent=2)
    write_atomic(out / "table.md", table(rows))
    plot(rows, out / "forgetting.png")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "forgetting")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "forgetting")
    parser.add_argument(
        "--only", nargs="*", default=None, help="rerun these settings; the others' rows are kept from --out"
    )
    parser.add_argument(
        "--replot", action="store_true", help="redraw table.md and the plot from results.json"
    )
    parser.add_argument("overrides", nargs="*", help="train.py key=value overrides for every setting")
    args = parser.parse_args(argv)
    if args.replot:
        results = json.loads((args.out / "results.json").read_text())
        write_results(results["settings"], args.out, results["machine"])
        return 0
    chosen = {k: v for k, v in SETTINGS.items() if args.only is None or k in args.only}
    rows = []
    start = time.perf_counter()
    if "self-replay" in chosen:
        from experiments.self_replay import build

        meta = build(REPLAY)
        print(f"[forgetting] self-replay data: {meta['answers kept']} of {meta['questions']} answers kept")
    for name, (overrides, what) in chosen.items():
        print(f"[forgetting] {name}: {what} ...", flush=True)
        row = run_setting(name, overrides, args.nproc, args.runs_dir, args.overrides)
        print(
            f"[forgetting] {name}: {row['steps']} steps in {row['wall_seconds']:.0f} s; changes: "
            + ", ".join(f"{m} {row[m]['change']:+.4f}" for m in MEASURES),
            flush=True,
        )
        rows.append(row)
    import os
    import platform

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.nproc} ranks"
    previous = args.out / "results.json"
    if args.only is not None and previous.is_file():
        kept = {r["setting"]: r for r in json.loads(previous.read_text())["settings"]}
        kept.update({r["setting"]: r for r in rows})
        rows = [kept[name] for name in SETTINGS if name in kept]
    write_results(rows, args.out, machine)
    print(table(rows), end="")
    print(
        f"[forgetting] {len(chosen)} settings run in {time.perf_counter() - start:.0f} s; written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
