"""The startup banner: what is trained, where, in which precision, on how much data, per rank."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from data.dataset import PreparedData
from data.loader import DistributedBatchLoader
from data.sources import read_questions
from fsdp.dist import Dist
from fsdp.flops import Throughput
from fsdp.memory import gib, has_places
from fsdp.precision import get_precision
from fsdp.schedule import LRSchedule


def data_lines(cfg: DictConfig, data: PreparedData, loader: DistributedBatchLoader) -> list[str]:
    """The data, as prepared: its sources and how full the batches are."""
    efficiency, targets_per_step = loader.epoch_statistics()
    return [
        f"data       {cfg.data.path} ({cfg.data.format}), prepared in {data.seconds:.1f} s"
        + (" from the cache" if data.cached else ""),
        *(f"    {line}" for line in data.lines),
        f"    batches: {efficiency:.1%} of positions are tokens (the rest padding); "
        f"{targets_per_step:,.0f} target tokens per optimizer step on average",
    ]


def eval_line(cfg: DictConfig, eval_examples: dict[str, int], n_prompts: int) -> str:
    """The held-out sets and the prompts answered before and after."""
    if eval_examples:
        held_out = (
            ", ".join(f"{name} {n:,} examples" for name, n in eval_examples.items())
            + " held out; before step 1, after the last"
            + (f" and every {cfg.eval.every_steps} steps" if cfg.eval.every_steps else "")
        )
    else:
        held_out = "no held-out set (data.eval_path, data.eval_fraction, data.general.eval_path, data.unseen.eval_path)"
    answers = (
        f"; {n_prompts} prompts answered before and after" if cfg.eval.max_new_tokens and n_prompts else ""
    )
    if cfg.eval.own_answers.prompts:
        n = len(read_questions(cfg.eval.own_answers.prompts))
        answers += f"; own answers to {n} questions kept before step 1, their loss evaluated (drift)"
    return "eval       " + held_out + answers


def loading_line(seconds: float, peaks: list[int]) -> str:
    return f"loading    {seconds:.1f} s; peak host memory per rank: " + ", ".join(gib(p) for p in peaks)


def memory_line(cfg: DictConfig, predicted: dict) -> str:
    """The analytic model's peak per rank and its three largest categories (fsdp/memory/analytic.py);
    offloaded (fsdp.cpu_offload), the device's and the host's, each with its largest categories."""

    def largest(source: dict, count: int = 3) -> str:
        biggest = sorted(source["categories"].items(), key=lambda kv: -kv[1])[:count]
        return ", ".join(f"{k} {gib(v)}" for k, v in biggest if v)

    track = "; memory.track=true measures it" if not cfg.memory.track else ""
    if not has_places(predicted):
        return (
            f"memory     analytic peak {gib(predicted['peak'])} per rank ({predicted['peak_phase']}), "
            + largest(predicted)
            + track
        )
    device, host = predicted["device"], predicted["host"]
    return (
        f"memory     analytic peak per rank: device {gib(device['peak'])} ({device['peak_phase']}), "
        f"{largest(device)}; host {gib(host['peak'])} ({host['peak_phase']}), {largest(host)}" + track
    )


def banner(
    cfg: DictConfig,
    *,
    distributed: Dist,
    hf_config,
    n_params: int,
    data: PreparedData,
    loader: DistributedBatchLoader,
    schedule: LRSchedule,
    precision_reason: str,
    loading: str,
    eval_examples: dict[str, int],
    predicted: dict,
    throughput: Throughput,
) -> str:
    """Everything the run was asked for and what it became, printed before the first step."""
    geometry = loader.geometry
    more = [
        *data_lines(cfg, data, loader),
        loading,
        eval_line(cfg, eval_examples, len(cfg.data.prompts) + len(cfg.data.general.prompts)),
        memory_line(cfg, predicted),
        throughput.describe(cfg.batch.max_seq_length),
    ]
    precision = get_precision(cfg.precision, state_dtype=cfg.optim.state_dtype)
    per_param = precision.bytes_per_param
    # Named only when set: null leaves m and v in the storage dtype, which the precision line implies.
    state = f" (m and v in {precision.state_label}: optim.state_dtype)" if cfg.optim.state_dtype else ""
    state_lines = [
        f"    {name:<16} {b:>2} bytes/param -> {gib(b * n_params / distributed.shard_size)} per rank"
        + (state if name == "optimizer state" else "")
        for name, b in per_param.items()
    ]
    layers = hf_config.num_hidden_layers
    checkpointing = cfg.activation_checkpointing
    lines = [
        "=" * 78,
        f"fulltune  preset={cfg.name}  run_dir={cfg.run_dir}",
        f"model      {cfg.model.name_or_path} ({type(hf_config).__name__.removesuffix('Config')}, "
        f"{n_params:,} params, {layers} layers{', random init' if cfg.model.random_init else ''})",
        f"ranks      {distributed.world_size} x {distributed.device.type} ({distributed.backend}), {torch.get_num_threads()} threads each",
        f"mesh       {distributed.describe_mesh()}",
        f"precision  {precision_reason}",
        f"           compute {precision.compute_label}; model state {sum(per_param.values())} bytes/param / "
        f"{distributed.shard_size} ranks",
        *state_lines,
        f"checkpoint activations: {checkpointing.mode}"
        + (f" (every {checkpointing.every_k})" if checkpointing.mode == "every_k" else "")
        + (
            " (every layer; matmul and attention outputs kept, no matmul recomputed)"
            if checkpointing.mode == "selective"
            else ""
        )
        + f"; FSDP: {layers} layer units + root, reshard_after_forward={cfg.fsdp.reshard_after_forward}",
        *offload_lines(cfg, distributed.device.type),
        speed_line(cfg),
        f"batch      {geometry.describe()}",
        f"schedule   {schedule.total_steps} steps, lr {cfg.optim.lr:g}, warmup {schedule.warmup_steps}, "
        f"{cfg.schedule.decay} "
        f"to {cfg.schedule.min_lr_ratio:g} x lr, clip {cfg.optim.max_grad_norm}",
        *more,
        "=" * 78,
    ]
    return "\n".join(lines)


def offload_lines(cfg: DictConfig, device_type: str) -> list[str]:
    """activation_checkpointing.offload, when on: what waits in host memory (fsdp/offload.py)."""
    checkpointing = cfg.activation_checkpointing
    if not checkpointing.offload:
        return []
    moved = {
        "full": "each layer's input (all the checkpoint keeps)",
        "selective": "each layer's input (the kept matmul outputs stay on the device)",
    }.get(checkpointing.mode, "what the layers save for backward")
    here = (
        "; on CPU (one memory) it saves nothing: the ledger books the bytes apart"
        if device_type == "cpu"
        else ", pinned"
    )
    return [f"           offloaded to host memory: {moved}, copied back in backward{here}"]


def speed_line(cfg: DictConfig) -> str:
    """The speed levers, each as set: the defaults are the plain, readable path."""
    fsdp = cfg.fsdp
    reduce = get_precision(cfg.precision, fsdp.reduce_dtype).reduce_label
    prefetch = f"explicit, {fsdp.explicit_prefetch} ahead" if fsdp.explicit_prefetch else "FSDP2's implicit"
    return (
        f"speed      reduce in {reduce}; root {'split' if fsdp.split_root else 'one unit'}; prefetch {prefetch}; "
        f"compile {'on' if cfg.compile else 'off'}; AdamW {cfg.optim.impl}"
    )
