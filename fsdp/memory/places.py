"""Where each byte lives: the device, or host memory when fsdp.cpu_offload puts the model state
there, or activation_checkpointing.offload the activations.

FSDP2's CPUOffloadPolicy keeps every sharded parameter, its sharded gradient (copied to the host
after the reduce-scatter) and so AdamW's state in (pinned) host memory, and the optimizer steps
there; each unit's shards are copied to the device for its all-gather. So the model state, and
the optimizer step's temporaries, are the host's; gathered state, activations, logits,
communication buffers and the backward's temporaries are the device's. Without offloading,
every byte is the device's.

Activation offloading (fsdp/offload.py) splits one category: what the layers save for backward
waits on the host, the layer running now (and, in backward, what is brought back) is on the
device. So activations have bytes in both places, and a prediction gives them per place: a
value {"host": bytes, "device": bytes} where every other category holds a number.
"""

from __future__ import annotations

from fsdp.memory.vocabulary import CATEGORIES, OFFLOADED, PHASES, PLACES

Bytes = int | dict[str, int]  # a number, or for a category split between places, its bytes in each


def whole(value: Bytes) -> int:
    """A category's bytes in every place together."""
    return sum(value.values()) if isinstance(value, dict) else value


def place(
    category: str, where: str, cpu_offload: bool, phase: str | None = None, activation_offload: bool = False
) -> bool:
    """Whether `category` (in `phase`, where it matters) has bytes in `where`: host or device.
    Offloaded activations have bytes in both (split by the prediction)."""
    if category not in CATEGORIES or where not in PLACES:
        raise ValueError(f"{category!r} in {where!r}: expected a category of {CATEGORIES} in {PLACES}")
    if activation_offload and category == "activations":
        return True
    on_host = cpu_offload and (
        category in OFFLOADED or (category == "temporaries" and phase == "optimizer step")
    )
    return on_host == (where == "host")


def by_place(
    categories: dict[str, Bytes],
    temporaries: dict[str, int],
    moments: dict[str, list[dict[str, Bytes]]],
    cpu_offload: bool,
    activation_offload: bool = False,
) -> dict[str, dict]:
    """A prediction's categories and phase peaks, per place.

    `moments`: for each phase, the bytes by category alive together at each of its worst moments;
    a place's phase peak is the largest sum of its own categories over those moments. The
    temporaries split by where they are made: the optimizer step's on the host when offloading.
    A category split between places (offloaded activations) is given per place, in `categories`
    and in every moment.
    """

    def bytes_in(category: str, value: Bytes, where: str, phase: str | None = None) -> int:
        if not place(category, where, cpu_offload, phase, activation_offload):
            return 0
        return value[where] if isinstance(value, dict) else value

    out = {}
    for where in PLACES:
        cats = {k: bytes_in(k, v, where) for k, v in categories.items()}
        if cpu_offload:
            step = where == "host"
            cats["temporaries"] = max(v for k, v in temporaries.items() if (k == "optimizer step") == step)
        phases = {
            phase: max(sum(bytes_in(k, v, where, phase) for k, v in m.items()) for m in ms)
            for phase, ms in moments.items()
        }
        out[where] = {
            "categories": cats,
            "phases": phases,
            "peak": max(phases.values()),
            "peak_phase": max(PHASES, key=phases.get),
        }
    return out
