"""The forgetting experiment: the three usual defences against forgetting, each switched off once.

    make forgetting                      # about 25 minutes on 2 cores; writes docs/forgetting/
    python -m experiments.forgetting --nproc 2 --out docs/forgetting

Every setting is `train.py preset=cpu-demo` (SmolLM2-135M, the medical-terminology task, 2 CPU
ranks) on the same seeded subset of domain examples, evaluated on the same held-out examples
before and after. The three defences: a low learning rate, few epochs, general data mixed in. One
or two things change per row against the baseline (general fraction 0.2, the demo's learning
rate, one epoch):

    no mixing          data.general.fraction=0        the anchor removed
    lr x10             optim.lr ten times higher       the gentle nudge made a push
    3 epochs           train.epochs=3                  the same data seen three times
    lr x10, no mixing  both                            does the anchor hold when the push comes?

What is measured per setting: the change of the domain held-out loss (negative: learned) and of
the general-English held-out loss (positive: forgot), both from the run's eval.json. Written:
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
}
# The budget: a seeded subset of the domain examples (each setting sees the same ones), no
# checkpoint, no export, no generations (the default job shows those); the held-out sets as the
# default job's (48 examples each).
COMMON = [
    "preset=cpu-demo",
    "overwrite=true",
    "data.max_train_examples=80",
    "train.max_steps=null",
    "checkpoint.at_end=false",
    "export.enabled=false",
    "eval.max_new_tokens=0",
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
        "domain": report["sets"]["domain"],
        "general": report["sets"]["general"],
        "domain_gain": report["domain_gain"],
        "forgetting": report["forgetting"],
    }


def table(rows: list[dict]) -> str:
    """The markdown table: held-out loss before -> after and its change, per setting."""
    lines = [
        "| setting | steps | domain loss before -> after | domain change | general loss before -> after "
        "| general change (forgetting) |",
        "|---|---:|---|---:|---|---:|",
    ]
    for r in rows:
        d, g = r["domain"], r["general"]
        lines.append(
            f"| {r['setting']} | {r['steps']} | {d['loss_before']:.4f} -> {d['loss_after']:.4f} | "
            f"{d['change']:+.4f} | {g['loss_before']:.4f} -> {g['loss_after']:.4f} | {g['change']:+.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Domain loss change (down: learned) against general loss change (right: forgot), one point per setting."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    right = max(r["general"]["change"] for r in rows)
    for r in rows:
        x, y = r["general"]["change"], r["domain"]["change"]
        ax.scatter([x], [y], s=60)
        near_edge = x > 0.6 * right > 0  # label to the left, inside the axes
        ax.annotate(
            r["setting"],
            (x, y),
            textcoords="offset points",
            xytext=(-6 if near_edge else 6, 6),
            ha="right" if near_edge else "left",
        )
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("general-English held-out loss change (right = forgot)")
    ax.set_ylabel("domain held-out loss change (down = learned)")
    ax.set_title("SmolLM2-135M on medical terms: learned vs forgotten")
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
    for name, (overrides, what) in chosen.items():
        print(f"[forgetting] {name}: {what} ...", flush=True)
        row = run_setting(name, overrides, args.nproc, args.runs_dir, args.overrides)
        print(
            f"[forgetting] {name}: {row['steps']} steps in {row['wall_seconds']:.0f} s; domain change "
            f"{row['domain']['change']:+.4f}, general change {row['general']['change']:+.4f}",
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
