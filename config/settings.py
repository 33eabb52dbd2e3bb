"""Typed settings from the config: each mechanism gets the dataclass it needs, built once here.

The mechanisms under fsdp/ never see the Hydra config; what a key means is decided in one place.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from batch import BatchGeometry
from config.compose import grad_accum_steps, load_config, model_config_source, resolve_precision
from config.validate import resume_fingerprint, validate_estimate
from data.loader import eval_batches
from data.sft import encode_answer, prompt_ids
from data.sources import read_questions
from fsdp.activation import recomputed_layers
from fsdp.build import BuildSettings
from fsdp.checkpoint import CheckpointSettings
from fsdp.dist import Dist, replicate_degree
from fsdp.evaluate import Evaluator, OwnAnswers
from fsdp.export import ExportTarget
from fsdp.flops import FlopsModel, Throughput, device_peak_tflops
from fsdp.generate import Generation, stop_token_ids
from fsdp.instruments import InstrumentSettings
from fsdp.memory import ModelShape, Workload
from fsdp.metrics import MetricsLogger
from fsdp.model import load_hf_config
from fsdp.schedule import LRSchedule, warmup_steps


def build_settings(cfg: DictConfig) -> BuildSettings:
    """How the model is wrapped, checkpointed and sharded (fsdp/build.py)."""
    return BuildSettings(
        precision=cfg.precision,
        checkpointing=cfg.activation_checkpointing.mode,
        every_k=cfg.activation_checkpointing.every_k,
        reshard_after_forward=cfg.fsdp.reshard_after_forward,
        cpu_offload=cfg.fsdp.cpu_offload,
        activation_offload=cfg.activation_checkpointing.offload,
        chunk_tokens=cfg.loss.chunk_tokens,
        reduce_dtype=cfg.fsdp.reduce_dtype,
        split_root=cfg.fsdp.split_root,
        explicit_prefetch=cfg.fsdp.explicit_prefetch,
        compile=cfg.compile,
    )


def geometry(cfg: DictConfig, world_size: int) -> BatchGeometry:
    """Sequences per micro-batch, micro-batches per step, ranks, and their length."""
    return BatchGeometry(
        micro_batch_size=cfg.batch.micro_batch_size,
        grad_accum_steps=grad_accum_steps(cfg, world_size),
        world_size=world_size,
        max_seq_length=cfg.batch.max_seq_length,
    )


def workload(
    cfg: DictConfig, world_size: int, device: str = "cuda", local_world_size: int | None = None
) -> Workload:
    """What the memory model needs of a run: its build, its batch geometry, where it runs, and its
    mesh: fsdp.replicate resolved as the run resolves it, from the ranks per node
    (`local_world_size`; None: every rank on one node)."""
    replicate = replicate_degree(cfg.fsdp.replicate, world_size, local_world_size or world_size)
    return Workload.of(
        build_settings(cfg),
        geometry(cfg, world_size),
        reduce_grads_every_microbatch=cfg.fsdp.reduce_grads_every_microbatch,
        device=device,
        optim_impl=cfg.optim.impl,
        replicate=replicate,
        state_dtype=cfg.optim.state_dtype,
        decay_embeddings=cfg.optim.decay_embeddings,
    )


def adamw_settings(cfg: DictConfig) -> dict:
    """make_adamw's arguments (fsdp/adamw.py) but the parameter groups: impl, lr, betas, eps, state dtype."""
    optim = cfg.optim
    return {
        "impl": optim.impl,
        "lr": optim.lr,
        "betas": tuple(optim.betas),
        "eps": optim.eps,
        "state_dtype": optim.state_dtype,
    }


def chosen_eval_sets(cfg: DictConfig, held_out: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The held-out sets this run evaluates: those eval.sets names, or (null) every one the data has."""
    return {
        name: examples
        for name, examples in held_out.items()
        if cfg.eval.sets is None or name in cfg.eval.sets
    }


def answered_prompts(cfg: DictConfig) -> list[tuple[str, str]]:
    """The questions answered greedily before and after training, each with the set it asks about."""
    return [("domain", p) for p in cfg.data.prompts] + [("general", p) for p in cfg.data.general.prompts]


def evaluator(
    cfg: DictConfig,
    model,
    *,
    tokenizer,
    eval_sets: dict[str, list[dict]],
    pad_id: int,
    distributed: Dist,
    metrics: MetricsLogger,
    precision: str,
    model_folder: Path,
) -> Evaluator:
    """The run's Evaluator (fsdp/evaluate.py): this rank's share of each held-out set, the prompts
    in the chat template, greedy generation's stop tokens, the own-answers drift, and the file that
    keeps the pretrained model's step-0 evaluation."""
    generation_config = getattr(model.causal_lm, "generation_config", None)
    batches = eval_batching(cfg, distributed.rank, distributed.world_size, pad_id)
    drift = own_answers(cfg, tokenizer, batches)
    stop_ids = stop_token_ids(tokenizer, generation_config)
    return Evaluator(
        model,
        sets={name: batches(examples) for name, examples in eval_sets.items()},
        examples={name: len(examples) for name, examples in eval_sets.items()},
        prompts=[(name, text, prompt_ids(tokenizer, text)) for name, text in answered_prompts(cfg)],
        decode=partial(tokenizer.decode, skip_special_tokens=True),
        generation=Generation(cfg.eval.max_new_tokens, stop_ids, pad_id),
        every_steps=cfg.eval.every_steps,
        device=distributed.device,
        metrics=metrics,
        own_answers=drift,
        before_cache=before_cache(cfg, precision, model_folder, eval_sets, drift),
        set_keys=eval_set_keys(eval_sets, drift),
    )


def eval_batching(cfg: DictConfig, rank: int, world_size: int, pad_id: int) -> partial:
    """examples -> this rank's eval micro-batches, at most the training micro-batch (so they fit)."""
    micro = cfg.eval.micro_batch_size or cfg.batch.micro_batch_size
    return partial(eval_batches, rank=rank, world_size=world_size, micro_batch_size=micro, pad_id=pad_id)


def own_answers(cfg: DictConfig, tokenizer, batches) -> OwnAnswers | None:
    """The own-answers drift (eval.own_answers), its questions in the chat template; or None."""
    own = cfg.eval.own_answers
    if own.prompts is None:
        return None
    prompts = [prompt_ids(tokenizer, q) for q in read_questions(own.prompts)]
    return OwnAnswers(prompts, own.max_new_tokens, encode_answer, batches)


def before_cache(
    cfg: DictConfig, precision: str, model_folder: Path, eval_sets: dict, own: OwnAnswers | None
) -> Path | None:
    """Where the pretrained model's step-0 evaluation is kept: a file named by everything it
    depends on (the model's files, the precision and device, the eval examples, the questions)."""
    if cfg.eval.cache_dir is None or cfg.model.random_init or not (eval_sets or own):
        return None
    files = sorted(p for p in Path(model_folder).rglob("*") if p.is_file())
    key = {
        "version": 1,
        "model": [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "overrides": OmegaConf.to_container(cfg.model.config_overrides),
        "precision": [precision, cfg.device, torch.__version__],
        "sets": {n: [(e["input_ids"], e["labels"]) for e in examples] for n, examples in eval_sets.items()},
        "own_answers": [own.prompts, own.max_new_tokens] if own else None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cfg.eval.cache_dir) / f"before-{digest}.json"


def eval_set_keys(eval_sets: dict, own: OwnAnswers | None) -> dict[str, str]:
    """A digest of each held-out set's examples, and of the own-answers questions: what a resumed
    run compares with its checkpoint's before trusting the checkpoint's 'before' losses."""

    def digest(value: object) -> str:
        return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:20]

    keys = {n: digest([(e["input_ids"], e["labels"]) for e in examples]) for n, examples in eval_sets.items()}
    if own:
        keys["own_answers"] = digest([own.prompts, own.max_new_tokens])
    return keys


def lr_schedule(cfg: DictConfig, total_steps: int) -> LRSchedule:
    """The learning rate of each step: warmup to optim.lr, then the decay to its floor."""
    schedule = cfg.schedule
    return LRSchedule(
        peak_lr=cfg.optim.lr,
        total_steps=total_steps,
        warmup_steps=warmup_steps(total_steps, schedule.warmup_steps, schedule.warmup_ratio),
        decay=schedule.decay,
        min_lr_ratio=schedule.min_lr_ratio,
    )


def instrument_settings(cfg: DictConfig, geometry: BatchGeometry) -> InstrumentSettings:
    return InstrumentSettings(
        log_every=cfg.train.log_every,
        track_memory=cfg.memory.track,
        memory_all_ranks=cfg.memory.all_ranks,
        snapshot=cfg.memory.snapshot,
        track_comm=cfg.comm.track,
        precision=cfg.precision,
        reduce_dtype=cfg.fsdp.reduce_dtype,
        grad_accum_steps=geometry.grad_accum_steps,
        reduce_grads_every_microbatch=cfg.fsdp.reduce_grads_every_microbatch,
        compile=cfg.compile,
    )


def checkpoint_meta(cfg: DictConfig, world_size: int, total_steps: int) -> dict:
    """What every checkpoint's meta.json carries of the run: what a resume must share with it (the
    fingerprint), the whole resolved config, and the run's last step."""
    return {
        "fingerprint": resume_fingerprint(cfg, world_size),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "total_steps": total_steps,  # a checkpoint at this step is the run's last
    }


def checkpoint_settings(cfg: DictConfig) -> CheckpointSettings:
    checkpoint = cfg.checkpoint
    return CheckpointSettings(
        every_steps=checkpoint.every_steps, at_end=checkpoint.at_end, keep_last=checkpoint.keep_last
    )


def export_target(cfg: DictConfig) -> ExportTarget | None:
    """Where the run's Hugging Face folder goes, its dtype and largest file; None: no export."""
    export = cfg.export
    if not export.enabled:
        return None
    return ExportTarget(Path(cfg.run_dir) / "model", export.dtype, int(export.max_shard_mb * 2**20))


def run_length(cfg: DictConfig) -> dict:
    """What sets how many steps the run has, beyond the data: a checkpoint records it."""
    return {"epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps}


def throughput(cfg: DictConfig, shape: ModelShape, device: torch.device) -> Throughput:
    """FLOPs per token of this model, the layers whose matmuls run again in backward (none under
    selective checkpointing), and the device's peak."""
    checkpointing = cfg.activation_checkpointing
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Throughput(
        FlopsModel.from_shape(shape),
        len(recomputed_layers(shape.layers, checkpointing.mode, checkpointing.every_k)),
        device_peak_tflops(name, cfg.metrics.peak_tflops),
    )


def studied_run(argv: list[str]) -> tuple:
    """What estimate.py and explain.py study, from their command line: the config, the model's
    config (read from disk, never downloaded) and the run's workload at memory.world_size ranks
    on memory.nodes nodes (fsdp.replicate=auto: one replica per node). Raises ConfigError for a
    bad value, as train.py's checks do."""
    cfg = load_config(argv)
    resolve_precision(cfg, "cuda")  # they study a GPU run: auto is mixed there
    validate_estimate(cfg)  # memory.nodes and the mesh included
    world_size, nodes = cfg.memory.world_size, cfg.memory.nodes
    hf_config = load_hf_config(model_config_source(cfg), dict(cfg.model.config_overrides))
    return cfg, hf_config, workload(cfg, world_size, local_world_size=world_size // nodes)
