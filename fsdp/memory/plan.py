"""What fits: the memory levers tried in order of what they cost, and the cheapest plans under a budget.

Every lever trades bytes on the device for something else, and the planner prices that something
per optimizer step and per rank, from the analytic model (analytic.py) and the FLOPs model
(fsdp/flops.py):
  recompute      activation checkpointing re-runs the forward of the layers it checkpoints:
                 their matmul FLOPs again (full, every_k); selective re-runs only the cheap ops,
                 no matmul, which the FLOP convention does not count.
  host<->device  activation offloading copies the saved activations to the host and back: 2 x
                 the host's activations per micro-batch. CPU offload copies each unit's shards
                 to the device at every all-gather (2 per micro-batch when layers are resharded
                 after forward), the gradient shards back once per reduction, and AdamW steps on
                 the host, reading and writing every shard of the model state there.
  communication  reducing every micro-batch instead of once per step: accumulation - 1 more
                 reduce-scatters of every gradient.
  numerics       bf16 moments change the numbers (m and v rounded to 8 bits of mantissa), which
                 no speed makes up for: the last resort, after every plan that keeps them fp32.
Costs become seconds at an assumed GPU (`Hardware`, printed with the plans) so that the three kinds
of cost can be ranked against each other; plans are ranked by what changes the numbers, then by
those seconds, then by how many levers they turn on. The micro-batch, sequence and accumulation stay
the user's: they are the recipe, not a lever.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from fsdp.activation import MODES, recomputed_layers
from fsdp.flops import FlopsModel
from fsdp.memory.analytic import ModelShape, Workload, predict, sharded_numel
from fsdp.precision import DTYPES, get_precision


@dataclass(frozen=True)
class Hardware:
    """What a plan's costs are converted to seconds at: an H100/H200-class GPU, PCIe to the host."""

    achieved_tflops: float = 400.0  # 40% of the dense bf16 peak of an H100/H200 (989 TFLOP/s)
    pcie_gb_s: float = 25.0  # host <-> device, each way, pinned memory
    link_gb_s: float = 150.0  # between GPUs, bus bandwidth of a reduce-scatter (NVLink)
    host_gb_s: float = 10.0  # what one rank's AdamW streams through host memory

    def describe(self) -> str:
        return (
            f"{self.achieved_tflops:g} TFLOP/s achieved (40% of an H100's dense bf16 peak), PCIe "
            f"{self.pcie_gb_s:g} GB/s, {self.link_gb_s:g} GB/s between GPUs, AdamW on the host at {self.host_gb_s:g} GB/s"
        )


# The analytic device peak is held within 3% of the fake step's, lever by lever (the tests' sweep):
# a plan fits when it fits with that much to spare, so that it fits by the fake step too.
HEADROOM = 0.03


def fits(device_peak: int, budget_bytes: int) -> bool:
    """Whether an analytic device peak fits the budget, the model's error bound kept free."""
    return device_peak <= budget_bytes * (1 - HEADROOM)


# The levers, each as (Workload field, the value that turns it on, the config key that does).
# The checkpointing mode is a lever of several values; every_k is planned at k = 2.
LEVERS = (
    ("activation_offload", True, "activation_checkpointing.offload=true"),
    ("cpu_offload", True, "fsdp.cpu_offload=true"),
    ("state_dtype", "bf16", "optim.state_dtype=bf16"),
    ("reduce_grads_every_microbatch", True, "fsdp.reduce_grads_every_microbatch=true"),
)


@dataclass(frozen=True)
class Plan:
    """One combination of levers, its prediction and what it costs per step and rank."""

    workload: Workload
    prediction: dict
    recompute_flops: float
    host_device_bytes: int
    comm_bytes: int
    host_optimizer_bytes: int
    numerics: int  # levers that change the numbers (bf16 moments)

    def seconds(self, hw: Hardware) -> float:
        """The plan's extra seconds per step at `hw`, over a step that recomputes and moves nothing."""
        return (
            self.recompute_flops / (hw.achieved_tflops * 1e12)
            + self.host_device_bytes / (hw.pcie_gb_s * 1e9)
            + self.comm_bytes / (hw.link_gb_s * 1e9)
            + self.host_optimizer_bytes / (hw.host_gb_s * 1e9)
        )

    @property
    def device_peak(self) -> int:
        return self.prediction["device"]["peak"]

    def overrides(self) -> list[str]:
        """The config keys that turn this plan's levers on (activation checkpointing's always)."""
        w = self.workload
        out = [f"activation_checkpointing.mode={w.checkpointing}"]
        if w.checkpointing == "every_k":
            out.append(f"activation_checkpointing.every_k={w.every_k}")
        return out + [key for field, _, key in self.turned_on()]

    def label(self) -> str:
        """The plan in a few words: its checkpointing and the levers it turns on."""
        w = self.workload
        names = {
            "activation_offload": "activation offload",
            "cpu_offload": "CPU offload",
            "state_dtype": "bf16 moments",
            "reduce_grads_every_microbatch": "reduce every micro-batch",
        }
        ac = f"AC {w.checkpointing}" + (f" (k={w.every_k})" if w.checkpointing == "every_k" else "")
        return " + ".join([ac] + [names[field] for field, _, _ in self.turned_on()])

    def turned_on(self) -> list[tuple[str, object, str]]:
        """The LEVERS this plan turns on (checkpointing aside)."""
        return [lever for lever in LEVERS if getattr(self.workload, lever[0]) == lever[1]]

    def levers(self) -> set[str]:
        mode = self.workload.checkpointing
        return {field for field, _, _ in self.turned_on()} | ({f"ac:{mode}"} if mode != "none" else set())


def costs(shape: ModelShape, w: Workload) -> Plan:
    """`w` priced: the prediction, then the recompute, host-device and communication bytes per step."""
    predicted = predict(shape, w)
    mode = get_precision(w.precision, w.reduce_dtype, w.state_dtype)
    p, r = mode.storage_bytes, mode.reduce_bytes
    tokens = w.micro_batch_size * w.seq_len * w.grad_accum_steps
    flops = FlopsModel.from_shape(shape)
    recomputed = len(recomputed_layers(shape.layers, w.checkpointing, w.every_k))  # selective: none
    recompute = tokens * (
        flops.hardware_flops_per_token(w.seq_len, recomputed) - flops.hardware_flops_per_token(w.seq_len, 0)
    )

    n = w.shard_size
    units = shape.unit_shapes()
    local = sharded_numel([s for u in units for s in u], n)
    padded = sum(sharded_numel(u, n) * n for u in units)
    traffic = predicted["activation copies"]  # offloaded activations, out and back, every micro-batch
    host_optimizer = 0
    reductions = w.grad_accum_steps if w.reduce_grads_every_microbatch else 1
    if w.cpu_offload:
        gathers = 2 if w.reshard_after_forward else 1
        traffic += p * local * (gathers * w.grad_accum_steps + reductions)
        # params read and written, grads read, m and v both
        host_optimizer = local * (2 * p + p + 4 * mode.state_bytes)
    extra_reductions = reductions - 1
    comm = int(extra_reductions * r * padded * (n - 1) / n)
    return Plan(
        w,
        predicted,
        recompute,
        traffic,
        comm,
        host_optimizer,
        numerics=int(w.state_dtype == "bf16" and mode.storage != DTYPES["bf16"]),
    )


def candidates(w: Workload) -> list[Workload]:
    """Every combination of the levers on `w`: checkpointing modes x offloads x bf16 moments x reductions
    (but those that do nothing, or that the run refuses: reducing a single micro-batch every
    micro-batch; bf16 moments under torch's fused AdamW, whose kernel keeps them in the weights' dtype)."""
    out = []
    accumulating = w.grad_accum_steps > 1
    for mode, *flags in itertools.product(MODES, *[(False, True)] * len(LEVERS)):
        trial = replace(w, checkpointing=mode, every_k=2 if mode == "every_k" else w.every_k)
        on = dict(zip((f for f, _, _ in LEVERS), flags, strict=True))
        if on["reduce_grads_every_microbatch"] and not accumulating:
            continue
        if on["state_dtype"] and w.optim_impl == "fused":
            continue
        for field, value, _ in LEVERS:
            off = {"state_dtype": None}.get(field, False)
            trial = replace(trial, **{field: value if on[field] else off})
        out.append(trial)
    return out


def plans(shape: ModelShape, w: Workload, budget_bytes: int, hw: Hardware | None = None) -> list[Plan]:
    """The plans whose device peak fits `budget_bytes` (`fits`), cheapest first (fp32 moments before bf16), each minimal: none whose
    levers include another fitting plan's (that one is cheaper and fits already)."""
    hw = hw or Hardware()
    fitting = [
        plan for plan in map(lambda t: costs(shape, t), candidates(w)) if fits(plan.device_peak, budget_bytes)
    ]
    fitting.sort(key=lambda plan: (plan.numerics, round(plan.seconds(hw), 6), len(plan.levers())))
    minimal: list[Plan] = []
    for plan in fitting:
        if not any(kept.levers() < plan.levers() for kept in minimal):
            minimal.append(plan)
    return minimal


def smallest_world(
    shape: ModelShape, w: Workload, budget_bytes: int, most: int = 4096
) -> tuple[int, list[Plan]]:
    """The fewest GPUs (1, 2, 4, then whole nodes of 8) on which some plan fits, and its plans
    (the same micro-batch and accumulation per GPU); (0, []) when not even `most` would do.

    The device's bytes shrink as GPUs are added, so `most` is tried first (nothing fits there:
    nothing fits), then the powers of two, then the nodes between the last that failed and the
    first that fit."""

    def on(n: int) -> list[Plan]:
        return plans(shape, replace(w, world_size=n, replicate=1), budget_bytes)

    if not on(most):
        return 0, []
    tried = w.world_size
    for n in (1, 2, 4, *(8 * 2**i for i in range(most.bit_length()) if 8 * 2**i <= most)):
        if n <= tried:
            continue
        found = on(n)
        if found:
            for between in range(max(8, tried - tried % 8 + 8), n, 8):
                fewer = on(between)
                if fewer:
                    return between, fewer
            return n, found
        tried = n
    return 0, []


def quick_math_table(
    num_params: int, world_size: int, precision: str, state_dtype: str | None = None
) -> list[tuple[str, float, float]]:
    """The usual quick math beside this code's model-state accounting: (row, GB whole, GB per rank).

    The common rule of thumb counts 16-bit weights (2 bytes/param), AdamW's m and v (8) and 16-bit
    gradients (2) on one GPU: 12 bytes/param, 84 GB for 7B. This code keeps fp32 master weights
    and fp32 gradients too (mixed: 4 + 4 + 8 = 16 bytes/param, the ZeRO paper's count; 12 with
    optim.state_dtype=bf16), and shards all three over the ranks. GB here are 10^9 bytes, as the
    rule of thumb is usually written.
    """
    gb = 1e9
    rows = [
        ("quick math: weights, 16-bit (2 B/param)", 2 * num_params / gb, math.nan),
        ("quick math: AdamW states (8 B/param)", 8 * num_params / gb, math.nan),
        ("quick math: gradients, 16-bit (2 B/param)", 2 * num_params / gb, math.nan),
        ("quick math: total, one GPU", 12 * num_params / gb, math.nan),
    ]
    bytes_per_param = get_precision(precision, state_dtype=state_dtype).bytes_per_param  # optim.state_dtype
    for name, b in bytes_per_param.items():
        rows.append(
            (
                f"fulltune {precision}: {name} ({b} B/param)",
                b * num_params / gb,
                b * num_params / gb / world_size,
            )
        )
    total = sum(bytes_per_param.values())
    rows.append(
        (
            f"fulltune {precision}: model state ({total} B/param)",
            total * num_params / gb,
            total * num_params / gb / world_size,
        )
    )
    return rows


@dataclass(frozen=True)
class Answer:
    """What the planner says of a run under a budget: the run as configured, priced, and the
    cheapest plans that fit on `world_size` GPUs (the run's own, or the fewest that would do)."""

    budget_bytes: int
    configured: Plan
    world_size: int
    plans: list[Plan]
    hardware: Hardware

    @property
    def recommended(self) -> Plan | None:
        return self.plans[0] if self.plans else None


def plan(shape: ModelShape, w: Workload, budget_bytes: int, hw: Hardware | None = None) -> Answer:
    """The planner: what fits `w`'s GPUs in `budget_bytes` each, cheapest first; if nothing does, on
    how many GPUs something would."""
    hw = hw or Hardware()
    found, world = plans(shape, w, budget_bytes, hw), w.world_size
    if not found:
        world, found = smallest_world(shape, w, budget_bytes)
    return Answer(budget_bytes, costs(shape, w), world, found, hw)
