"""Every config key that moves memory, each as a lever: the Workload fields it sets, and the config
keys that set it in train.py. One table for everything that checks the memory model lever by lever:
the fake-tensor sweep in the tests, the real ledger of train.py, and the GPU check
(bench/memory_check.py, bench/gpu-memory.sh).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fsdp.memory.analytic import ModelShape, UnitSizes, Workload, predict
from fsdp.memory.vocabulary import CATEGORIES
from fsdp.precision import get_precision


@dataclass(frozen=True)
class Lever:
    """One memory lever, turned on over a base run: `fields` on the analytic model's Workload,
    `overrides` the same on train.py's command line."""

    name: str
    fields: dict = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    min_world: int = 1  # HSDP needs a replica of at least one rank more

    @property
    def key(self) -> str:
        """The lever in one word, for command lines: "AC full + activation offload" is ac-full-activation-offload."""
        return "-".join(self.name.lower().replace("+", " ").split())

    def on(self, base: Workload) -> Workload:
        """`base` with this lever turned on."""
        return replace(base, **self.fields)

    def applies_at(self, world_size: int) -> bool:
        return world_size >= self.min_world


MEMORY_LEVERS = (
    Lever("base"),
    Lever("AC selective", {"checkpointing": "selective"}, ("activation_checkpointing.mode=selective",)),
    Lever(
        "AC every_k",
        {"checkpointing": "every_k", "every_k": 2},
        ("activation_checkpointing.mode=every_k", "activation_checkpointing.every_k=2"),
    ),
    Lever("AC full", {"checkpointing": "full"}, ("activation_checkpointing.mode=full",)),
    Lever("activation offload", {"activation_offload": True}, ("activation_checkpointing.offload=true",)),
    Lever(
        "AC selective + activation offload",
        {"checkpointing": "selective", "activation_offload": True},
        ("activation_checkpointing.mode=selective", "activation_checkpointing.offload=true"),
    ),
    Lever(
        "AC full + activation offload",
        {"checkpointing": "full", "activation_offload": True},
        ("activation_checkpointing.mode=full", "activation_checkpointing.offload=true"),
    ),
    Lever("CPU offload", {"cpu_offload": True}, ("fsdp.cpu_offload=true",)),
    Lever("fp32", {"precision": "fp32"}, ("precision=fp32",)),
    Lever("bf16", {"precision": "bf16"}, ("precision=bf16",)),
    Lever("bf16 moments", {"state_dtype": "bf16"}, ("optim.state_dtype=bf16",)),
    Lever("AdamW foreach", {"optim_impl": "foreach"}, ("optim.impl=foreach",)),
    Lever("AdamW fused", {"optim_impl": "fused"}, ("optim.impl=fused",)),
    Lever(
        "AdamW foreach with embeddings decayed",
        {"optim_impl": "foreach", "decay_embeddings": True},
        ("optim.impl=foreach", "optim.decay_embeddings=true"),
    ),
    Lever("split root", {"split_root": True}, ("fsdp.split_root=true",)),
    Lever("no resharding", {"reshard_after_forward": False}, ("fsdp.reshard_after_forward=false",)),
    Lever(
        "reduce every micro-batch",
        {"reduce_grads_every_microbatch": True},
        ("fsdp.reduce_grads_every_microbatch=true",),
    ),
    Lever("bf16 reductions", {"reduce_dtype": "bf16"}, ("fsdp.reduce_dtype=bf16",)),
    Lever("HSDP 2 replicas", {"replicate": 2}, ("fsdp.replicate=2",), min_world=4),
)

LEVERS_BY_KEY = {lever.key: lever for lever in MEMORY_LEVERS}


def shard_copy_bytes(shape: ModelShape, w: Workload) -> int:
    """Under fsdp.cpu_offload, the device copy of the largest unit's shard that each all-gather
    starts from: in the analytic all-gather buffers, and not in a fake step, which runs on one CPU
    with nothing to copy the shards to."""
    if not w.cpu_offload:
        return 0
    sizes = UnitSizes.of(shape, w.shard_size, split_root=w.split_root)
    storage = get_precision(w.precision, w.reduce_dtype, w.state_dtype).storage_bytes
    return sizes.shard_copy(storage, w.shard_size)


@dataclass(frozen=True)
class Agreement:
    """The analytic model beside the fake step for one run: bytes per category and per phase peak,
    (analytic, fake) each, the fake's all-gather buffers given the shard copy it cannot make."""

    label: str
    categories: dict[str, tuple[int, int]]
    phases: dict[str, tuple[int, int]]
    peak: tuple[int, int]
    places: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # host, device: phases

    @classmethod
    def of(cls, label: str, shape: ModelShape, w: Workload, fake: dict) -> Agreement:
        predicted = predict(shape, w)
        measured = dict(fake["categories"])
        measured["all-gather buffers"] += shard_copy_bytes(shape, w)
        return cls(
            label=label,
            categories={c: (predicted["categories"][c], measured[c]) for c in CATEGORIES},
            phases={p: (predicted["phases"][p], v["total"]) for p, v in fake["phases"].items()},
            peak=(predicted["peak"], fake["peak"]),
            places={
                where: {
                    p: (predicted[where]["phases"][p], v["total"]) for p, v in fake[where]["phases"].items()
                }
                for where in ("host", "device")
                if where in predicted and where in fake
            },
        )

    def disagreements(self, tolerance: float = 0.03, floor: float = 0.01) -> list[str]:
        """What differs by more than `tolerance`: every phase peak (and each place's, host and
        device, where the model state or the activations are offloaded), and each category holding
        more than `floor` of the fake peak in either view."""
        out = []
        small = floor * self.peak[1]
        for name, (analytic, fake) in self.categories.items():
            if max(analytic, fake) > small and abs(analytic - fake) > tolerance * max(fake, 1):
                out.append(f"{name} {analytic / 2**20:.1f} MiB analytic, {fake / 2**20:.1f} fake")
        phases = dict(self.phases)
        phases.update(
            {f"{where} {name}": both for where, ps in self.places.items() for name, both in ps.items()}
        )
        for name, (analytic, fake) in phases.items():
            if abs(analytic - fake) > tolerance * max(fake, small):
                out.append(f"{name} peak {analytic / 2**20:.1f} MiB analytic, {fake / 2**20:.1f} fake")
        return [f"{self.label}: {line}" for line in out]


def sweep(hf_config, base: Workload, levers=MEMORY_LEVERS, worlds=(1, 2, 8)) -> list[Agreement]:
    """Each lever alone over `base`, at each world size where it applies: the analytic model beside
    the fake step (fsdp/memory/measure.py)."""
    from fsdp.memory.measure import measure_step_on_fake_tensors

    shape = ModelShape.from_hf_config(hf_config)
    out = []
    for n in worlds:
        for lever in levers:
            if lever.applies_at(n):
                w = lever.on(replace(base, world_size=n))
                fake = measure_step_on_fake_tensors(hf_config, w)
                out.append(Agreement.of(f"{lever.name} at {n}", shape, w, fake))
    return out
