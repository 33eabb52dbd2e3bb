"""Each memory lever alone on one model, per rank at 1 and 8 GPUs, predicted and measured on fake tensors.

    python bench/lever_table.py                                  # Mistral-7B, the table in docs/memory.md
    python bench/lever_table.py --model conf/model/llama3-8b.json --worlds 1 8 --seq 4096

The base run is one plain step (mixed precision, no checkpointing, one micro-batch of --micro x
--seq tokens); each row turns one lever on over it (HSDP at 8 GPUs: 2 nodes of 4). Per world size:
the analytic device peak and host peak (fsdp/memory/analytic.py), and the fake-tensor step's peak
(fsdp/memory/measure.py). The fake step runs on one CPU: offloaded model state is measured with the
rest (both places together), offloaded activations apart (the ledger books the host copies).
Prints a markdown table and writes it, with the numbers, as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from durable import write_atomic
from fsdp import memory
from fsdp.memory.measure import measure_step_on_fake_tensors
from fsdp.model import load_hf_config

ROWS = {
    "mixed, no checkpointing (the base)": {},
    "+ selective AC": {"checkpointing": "selective"},
    "+ full AC": {"checkpointing": "full"},
    "+ activation offload": {"activation_offload": True},
    "+ bf16 moments": {"state_dtype": "bf16"},
    "+ CPU offload": {"cpu_offload": True},
    "+ HSDP, 2 nodes (8 GPUs)": {"replicate": 2},
    "all of them: full AC, activation offload, bf16 moments, CPU offload": {
        "checkpointing": "full",
        "activation_offload": True,
        "state_dtype": "bf16",
        "cpu_offload": True,
    },
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="conf/model/mistral-7b.json", help="a config.json or model folder")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--micro", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--no-fake", action="store_true", help="analytic only")
    parser.add_argument("--out", type=Path, default=Path("bench/results/lever-table.json"))
    args = parser.parse_args()

    hf_config = load_hf_config(args.model)
    shape = memory.ModelShape.from_hf_config(hf_config)
    base = memory.Workload(
        1, "mixed", "none", micro_batch_size=args.micro, seq_len=args.seq, chunk_tokens=1024
    )
    results: dict[str, dict[int, dict]] = {}
    for row, change in ROWS.items():
        for n in args.worlds:
            if change.get("replicate", 1) > 1 and n % change["replicate"]:
                continue
            w = replace(base, world_size=n, **change)
            predicted = memory.predict(shape, w)
            start = time.perf_counter()
            fake = None if args.no_fake else measure_step_on_fake_tensors(hf_config, w)
            seconds = time.perf_counter() - start
            places = memory.has_places(predicted)
            results.setdefault(row, {})[n] = {
                "analytic device": predicted["device"]["peak"],
                "analytic host": predicted["host"]["peak"] if places else 0,
                "fake": fake["peak"] if fake else None,
                "fake device": fake["device"]["peak"] if fake and "device" in fake else None,
                "fake host": fake["host"]["peak"] if fake and "host" in fake else None,
                "seconds": seconds,
            }
            print(f"{row}, {n} GPUs: {results[row][n]}", file=sys.stderr, flush=True)

    def cell(v: int | None) -> str:
        return "-" if v is None else f"{v / 2**30:.1f}"

    head = "| lever | " + " | ".join(
        f"{n} GPU{'s' * (n > 1)}: analytic device / host | fake-measured (device / host)" for n in args.worlds
    )
    lines = [
        f"{args.model}: {shape.num_params:,} params, one micro-batch of {args.micro} x {args.seq} tokens, GiB per rank",
        "",
        head + " |",
        "|---|" + "---|---|" * len(args.worlds),
    ]
    for row, by_world in results.items():
        cells = []
        for n in args.worlds:
            r = by_world.get(n)
            if r is None:
                cells += ["", ""]
                continue
            cells.append(f"{cell(r['analytic device'])} / {cell(r['analytic host'])}")
            split = r["fake device"] is not None
            cells.append(f"{cell(r['fake device'])} / {cell(r['fake host'])}" if split else cell(r["fake"]))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    write_atomic(args.out, json.dumps({"model": args.model, "results": results, "markdown": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
