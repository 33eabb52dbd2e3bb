"""Where each byte lives: the device, or host memory when fsdp.cpu_offload puts the model state there.

FSDP2's CPUOffloadPolicy keeps every sharded parameter, its sharded gradient (copied to the host
after the reduce-scatter) and so AdamW's state in (pinned) host memory, and the optimizer steps
there; each unit's shards are copied to the device for its all-gather. So the model state, and
the optimizer step's temporaries, are the host's; gathered state, activations, logits,
communication buffers and the backward's temporaries are the device's. Without offloading,
every byte is the device's.
"""

from __future__ import annotations

from fsdp.memory.vocabulary import CATEGORIES, OFFLOADED, PHASES, PLACES


def place(category: str, where: str, cpu_offload: bool, phase: str | None = None) -> bool:
    """Whether `category` (in `phase`, where it matters) lives in `where`: host or device."""
    if category not in CATEGORIES or where not in PLACES:
        raise ValueError(f"{category!r} in {where!r}: expected a category of {CATEGORIES} in {PLACES}")
    on_host = cpu_offload and (
        category in OFFLOADED or (category == "temporaries" and phase == "optimizer step")
    )
    return on_host == (where == "host")


def by_place(
    categories: dict[str, int],
    temporaries: dict[str, int],
    moments: dict[str, list[dict[str, int]]],
    cpu_offload: bool,
) -> dict[str, dict]:
    """A prediction's categories and phase peaks, per place.

    `moments`: for each phase, the bytes by category alive together at each of its worst moments;
    a place's phase peak is the largest sum of its own categories over those moments. The
    temporaries split by where they are made: the optimizer step's on the host when offloading.
    """
    out = {}
    for where in PLACES:
        cats = {k: v if place(k, where, cpu_offload) else 0 for k, v in categories.items()}
        if cpu_offload:
            step = where == "host"
            cats["temporaries"] = max(v for k, v in temporaries.items() if (k == "optimizer step") == step)
        phases = {
            phase: max(sum(v for k, v in m.items() if place(k, where, cpu_offload, phase)) for m in ms)
            for phase, ms in moments.items()
        }
        out[where] = {
            "categories": cats,
            "phases": phases,
            "peak": max(phases.values()),
            "peak_phase": max(PHASES, key=phases.get),
        }
    return out
