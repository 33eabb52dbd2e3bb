"""What `fsdp.reduce_dtype=bf16` costs in precision: the summed gradients against fp32 reductions.

    torchrun --nproc_per_node=2 bench/reduce_precision.py
    torchrun --nproc_per_node=4 bench/reduce_precision.py

SmolLM2-135M, computing in fp32 (so the only difference is the reduction), one global batch of
make bench's data (8 sequences of at most 128 tokens, split over the ranks). The same model is
sharded twice, reducing in fp32 and in bf16; each parameter's whole gradient is gathered and
compared. Prints the relative L2 difference over all parameters, the largest per parameter, and
the gradient norm both ways (what clipping sees).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from peers import MODEL, global_batches  # noqa: E402

from data.loader import collate  # noqa: E402
from fsdp.build import BuildSettings, build_sharded_model  # noqa: E402
from fsdp.dist import init_distributed, print0, shutdown  # noqa: E402
from fsdp.model import load_hf_config  # noqa: E402


def gradients(d, reduce_dtype: str, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    settings = BuildSettings(precision="fp32", reduce_dtype=reduce_dtype)
    model = build_sharded_model(load_hf_config(MODEL), d, settings, pretrained=MODEL)
    mine = examples[d.rank :: d.world_size]
    batch = collate(mine, pad_id)
    targets = sum(sum(label != -100 for label in e["labels"]) for e in examples)
    (model(batch.input_ids, batch.position_ids, batch.labels) / targets).backward()
    return {n: p.grad.full_tensor() for n, p in model.named_parameters()}


def main() -> int:
    d = init_distributed("cpu", "gloo")
    (examples,), pad_id = global_batches(MODEL, 1, 8, 128)
    exact = gradients(d, "fp32", examples, pad_id)
    rounded = gradients(d, "bf16", examples, pad_id)
    squared = sum(float(((rounded[n] - exact[n]) ** 2).sum()) for n in exact)
    norm_exact = sum(float((g**2).sum()) for g in exact.values()) ** 0.5
    norm_rounded = sum(float((g**2).sum()) for g in rounded.values()) ** 0.5
    worst = max(exact, key=lambda n: float((rounded[n] - exact[n]).norm() / exact[n].norm().clamp_min(1e-30)))
    worst_rel = float((rounded[worst] - exact[worst]).norm() / exact[worst].norm())
    print0(
        f"reduce_dtype=bf16 against fp32, {d.world_size} ranks: relative L2 difference of the whole gradient "
        f"{squared**0.5 / norm_exact:.2e}; worst parameter {worst} {worst_rel:.2e}; gradient norm "
        f"{norm_exact:.6f} (fp32) vs {norm_rounded:.6f} (bf16)"
    )
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
