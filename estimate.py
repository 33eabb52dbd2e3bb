"""How much memory one training step needs on each rank, before anyone buys a GPU. No training.

    python estimate.py model=llama3-8b memory.world_size=8 memory.fit_gib=80     # or: make estimate
    python estimate.py model=llama3-8b memory.world_size=16 memory.nodes=2      # HSDP, beside 1-D

Three views side by side: the usual quick math (bytes per parameter), the analytic model (fsdp/memory/analytic.py)
and the real training step measured on fake tensors at that world size (fsdp/memory/measure.py:
a fake process group, every tensor a shape without memory, so rank 0 of 8 GPUs runs on a laptop,
as torchtitan's estimation script does). With memory.fit_gib, the planner (fsdp/memory/plan.py):
every combination of the memory levers priced per step, the cheapest that fit in that many GiB per
GPU (or the fewest GPUs on which one would), the command that runs it, and that plan measured on
fake tensors in place of the run as configured. With memory.nodes > 1 (and fsdp.replicate auto or > 1)
the run is HSDP's, and the same run on a 1-D mesh of as many ranks is shown beside it; with
fsdp.cpu_offload=true the analytic bytes are split into host and device. Any config key of
train.py applies.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import config
from config import settings
from fsdp import memory
from fsdp.memory.measure import measure_step_on_fake_tensors


def main(argv: list[str]) -> int:
    try:
        cfg, hf_config, w = settings.studied_run(argv)
    except config.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    shape = memory.ModelShape.from_hf_config(hf_config)
    plans = None
    if cfg.memory.fit_gib:
        answer = memory.plan(shape, w, int(cfg.memory.fit_gib * 2**30))
        plans = memory.plan_report(answer, argv, w.world_size // cfg.memory.nodes)
        w = answer.recommended.workload if answer.recommended else w
    workloads = [replace(w, replicate=1), w] if w.replicate > 1 else [w]
    start = time.perf_counter()
    steps = [
        (v, memory.predict(shape, v), measure_step_on_fake_tensors(hf_config, v, cfg.optim.max_grad_norm))
        for v in workloads
    ]
    seconds = time.perf_counter() - start
    name = cfg.model.name_or_path
    print(memory.estimate_report(name, shape, steps, seconds, plans), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
