"""Refuse bad input before anything heavy starts.

Every error is a `ConfigError` whose one-line message names the key that is wrong. It is raised
before the process group exists or a model is touched, and before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from config.compose import ConfigError, grad_accum_steps, model_config_source
from data.sources import BUILDERS, HUB_ID, read_questions
from fsdp import activation
from fsdp.adamw import IMPLS
from fsdp.checkpoint import complete_checkpoints
from fsdp.dist import device_type, replicate_degree
from fsdp.precision import DTYPES, PRECISIONS
from fsdp.rundir import LOCK_NAME

CHOICES = {
    "precision": ("auto", *PRECISIONS),
    "fsdp.reduce_dtype": (None, *DTYPES),
    "optim.impl": IMPLS,
    "optim.state_dtype": (None, *DTYPES),
    "device": ("auto", "cpu", "cuda"),
    "backend": ("auto", "gloo", "nccl"),
    "activation_checkpointing.mode": activation.MODES,
    "schedule.decay": ("cosine", "linear", "constant"),
    "export.dtype": tuple(DTYPES),
    "data.format": ("prompt_response", "chat", "text"),
    "data.general.format": ("text", "prompt_response", "chat"),
    "data.too_long": ("truncate", "drop"),
    "train.on_nonfinite": ("stop", "skip"),
}


def is_local_path(name_or_path: str) -> bool:
    return (
        Path(name_or_path).exists()
        or name_or_path.startswith((".", "/", "~"))
        or not HUB_ID.match(name_or_path)
    )


def validate_estimate(cfg: DictConfig) -> None:
    """estimate.py and explain.py: the common checks, a world size, a budget if any, and the model's
    config.json offline. They read no data and write no run folder."""
    m = cfg.memory
    if not isinstance(m.world_size, int) or m.world_size <= 0:
        raise ConfigError(f"memory.world_size={m.world_size}: must be a whole number of ranks > 0")
    validate_common(cfg, m.world_size)
    if not isinstance(m.nodes, int) or m.nodes < 1 or m.world_size % m.nodes:
        raise ConfigError(
            f"memory.nodes={m.nodes}: must be a whole number of nodes dividing {m.world_size} ranks"
        )
    validate_mesh(cfg, m.world_size, m.world_size // m.nodes)
    if m.fit_gib is not None and (not isinstance(m.fit_gib, int | float) or m.fit_gib <= 0):
        raise ConfigError(f"memory.fit_gib={m.fit_gib}: must be > 0 (GiB per rank) or null")
    if model_config_source(cfg) is None:
        raise ConfigError(
            f"model.config_file={cfg.model.config_file}: no such file, and model.name_or_path="
            f"{cfg.model.name_or_path} is not a local folder; the estimate needs the model's config.json "
            "on disk (it downloads nothing)"
        )


def validate(cfg: DictConfig, world_size: int) -> None:
    """A training run: raise ConfigError for the first bad value. Reads the file system, writes nothing."""
    validate_common(cfg, world_size)
    validate_launch(cfg, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    validate_model_and_data(cfg)
    validate_eval(cfg)
    run_dir = Path(cfg.run_dir)
    if cfg.resume.path is not None:
        validate_resume(cfg, world_size)
    elif run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir()) and not cfg.overwrite:
        raise ConfigError(
            f"run_dir={cfg.run_dir}: already holds a run; pass resume=auto to continue it, overwrite=true "
            f"to write over it, or choose another run_dir (or name)"
        )


def validate_common(cfg: DictConfig, world_size: int) -> None:
    """What every program reads: required keys, choices, positive sizes, the batch geometry."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: required and not set (e.g. {missing[0]}=...)")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            names = ("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"{key}={value}: must be one of {', '.join(names)}")

    positive = {
        "optim.lr": cfg.optim.lr,
        "batch.micro_batch_size": cfg.batch.micro_batch_size,
        "batch.grad_accum_steps": cfg.batch.grad_accum_steps,
        "batch.max_seq_length": cfg.batch.max_seq_length,
        "train.epochs": cfg.train.epochs,
        "loss.chunk_tokens": cfg.loss.chunk_tokens,
        "activation_checkpointing.every_k": cfg.activation_checkpointing.every_k,
        "comm.init_timeout_s": cfg.comm.init_timeout_s,
        "comm.train_timeout_s": cfg.comm.train_timeout_s,
    }
    for key, value in positive.items():
        if not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{key}={value}: must be > 0")
    if cfg.train.max_steps is not None and cfg.train.max_steps <= 0:
        raise ConfigError(f"train.max_steps={cfg.train.max_steps}: must be > 0 or null")
    if not 0 <= cfg.schedule.min_lr_ratio <= 1:
        raise ConfigError(f"schedule.min_lr_ratio={cfg.schedule.min_lr_ratio}: must be in [0, 1]")
    if cfg.fsdp.cpu_offload and cfg.device == "cpu":
        raise ConfigError("fsdp.cpu_offload=true: only meaningful with device=cuda")
    replicate = cfg.fsdp.replicate
    if replicate != "auto" and (
        not isinstance(replicate, int) or isinstance(replicate, bool) or replicate < 1
    ):
        raise ConfigError(f"fsdp.replicate={replicate}: must be auto or a whole number of replicas >= 1")
    validate_speed_levers(cfg)
    validate_state_dtype(cfg)
    grad_accum_steps(cfg, world_size)


def validate_launch(cfg: DictConfig, world_size: int, local_world_size: int) -> None:
    """The device, the backend and the mesh fit each other and this launch."""
    device = device_type(cfg.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device}: no CUDA device is visible on {socket.gethostname()}")
    if cfg.backend == "nccl" and device == "cpu":
        raise ConfigError(
            f"backend=nccl: NCCL runs on GPUs only, and device={cfg.device} is the CPU here; "
            "use backend=gloo (or auto)"
        )
    if cfg.backend == "gloo" and device == "cuda":
        raise ConfigError(
            "backend=gloo: FSDP on GPUs needs NCCL (gloo would stage every collective through the "
            "host, if it has it at all); use backend=nccl (or auto), or device=cpu"
        )
    if cfg.fsdp.cpu_offload and device == "cpu":
        raise ConfigError(
            f"fsdp.cpu_offload=true: only meaningful on GPUs, and device={cfg.device} is the CPU"
        )
    validate_mesh(cfg, world_size, local_world_size)


def validate_mesh(cfg: DictConfig, world_size: int, local_world_size: int) -> None:
    """fsdp.replicate, resolved as the run resolves it (auto: one replica per node), divides the ranks."""
    replicas = replicate_degree(cfg.fsdp.replicate, world_size, local_world_size)
    if world_size % replicas:
        raise ConfigError(
            f"fsdp.replicate={cfg.fsdp.replicate}: {replicas} replicas do not divide the {world_size} ranks"
        )


def validate_speed_levers(cfg: DictConfig) -> None:
    prefetch = cfg.fsdp.explicit_prefetch
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ConfigError(f"fsdp.explicit_prefetch={prefetch}: must be a whole number of units >= 0")
    for key in ("compile", "fsdp.split_root", "activation_checkpointing.offload"):
        if not isinstance(OmegaConf.select(cfg, key), bool):
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be true or false")
    if cfg.compile and device_type(cfg.device) == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
        raise ConfigError(
            "compile=true: torch.compile on CPU (inductor) needs a C++ compiler, and neither $CXX nor g++ "
            "is on PATH; install one or pass compile=false"
        )


def validate_state_dtype(cfg: DictConfig) -> None:
    """optim.state_dtype against what AdamW can do with it (fsdp/adamw.py says why of each)."""
    o = cfg.optim
    if o.state_dtype is None:
        return
    storage = "bf16" if cfg.precision == "bf16" else "fp32"  # auto is mixed or fp32: fp32 weights
    if o.state_dtype == "fp32" and storage == "bf16":
        raise ConfigError(
            "optim.state_dtype=fp32: wider than the bf16 parameters of precision=bf16, which AdamW "
            "updates in their own dtype; use null (or precision=mixed for fp32 weights and state)"
        )
    if o.state_dtype != storage and o.impl == "fused":
        raise ConfigError(
            f"optim.state_dtype={o.state_dtype}: optim.impl=fused runs torch's fused kernel, which needs m "
            f"and v in the parameters' dtype ({storage}); use optim.impl=loop or foreach"
        )
    smallest = torch.finfo(DTYPES[o.state_dtype]).eps / 2  # half an ulp, relative: 2^-8 for bf16
    if o.state_dtype != storage and any(1 - beta < smallest for beta in o.betas):
        raise ConfigError(
            f"optim.state_dtype={o.state_dtype}: optim.betas={list(o.betas)} move m or v by less than "
            f"{smallest:.2g} of the way per step, which {o.state_dtype} rounds away (at 0.999, v never "
            f"decays); use betas <= {1 - smallest:.6g} or state_dtype null"
        )


def validate_model_and_data(cfg: DictConfig) -> None:
    """The model folder and every data file exist; fractions and counts make sense."""
    name_or_path = cfg.model.name_or_path
    if is_local_path(name_or_path):
        folder = Path(name_or_path).expanduser()
        hint = " (the default model: run `make model`)" if ".cache/models" in name_or_path else ""
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={name_or_path}: no Hugging Face model folder there{hint}")

    data, general = cfg.data, cfg.data.general
    shipped = " (the shipped tasks: run `make data`)" if ".cache/data" in str(data.path) else ""
    is_hub_name = HUB_ID.match(str(data.path)) and Path(data.path).suffix not in BUILDERS
    if not Path(data.path).exists() and not is_hub_name:
        raise ConfigError(f"data.path={data.path}: no such file or folder{shipped}")
    for key, value in (
        ("data.eval_fraction", data.eval_fraction),
        ("data.general.fraction", general.fraction),
    ):
        if not 0 <= value < 1:
            raise ConfigError(f"{key}={value}: must be in [0, 1)")
    if general.fraction > 0 and (general.path is None or not Path(general.path).is_file()):
        raise ConfigError(
            f"data.general.path={general.path}: no such file, and data.general.fraction > 0{shipped}"
        )
    for key in (
        "data.eval_path",
        "data.general.eval_path",
        "data.unseen.eval_path",
        "eval.own_answers.prompts",
    ):
        value = OmegaConf.select(cfg, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{key}={value}: no such file{shipped if 'data' in key else ''}")

    for key in (
        "checkpoint.every_steps",
        "checkpoint.keep_last",
        "eval.every_steps",
        "eval.max_examples",
        "eval.micro_batch_size",
        "data.max_train_examples",
    ):
        value = OmegaConf.select(cfg, key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{key}={value}: must be a whole number > 0, or null")


def held_out_sets(cfg: DictConfig) -> dict[str, str]:
    """The eval sets the data config provides, each with the key that provides it."""
    data = cfg.data
    sets = {}
    if data.eval_path is not None or data.eval_fraction > 0:
        sets["domain"] = "data.eval_path" if data.eval_path is not None else "data.eval_fraction"
    if data.general.eval_path is not None:
        sets["general"] = "data.general.eval_path"
    if data.unseen.eval_path is not None:
        sets["unseen"] = "data.unseen.eval_path"
    return sets


def validate_eval(cfg: DictConfig) -> None:
    """eval.sets names only sets the data has; prompts are strings; generation length is >= 0."""
    e = cfg.eval
    if not isinstance(e.max_new_tokens, int) or e.max_new_tokens < 0:
        raise ConfigError(f"eval.max_new_tokens={e.max_new_tokens}: must be a whole number >= 0")
    for key in ("data.prompts", "data.general.prompts"):
        value = OmegaConf.select(cfg, key)
        if not OmegaConf.is_list(value) or not all(isinstance(p, str) and p.strip() for p in value):
            raise ConfigError(f"{key}={value}: must be a list of non-empty strings")
    own = e.own_answers
    if not isinstance(own.max_new_tokens, int) or own.max_new_tokens <= 0:
        raise ConfigError(f"eval.own_answers.max_new_tokens={own.max_new_tokens}: must be a whole number > 0")
    if own.prompts is not None and Path(own.prompts).is_file() and not read_questions(own.prompts):
        raise ConfigError(f"eval.own_answers.prompts={own.prompts}: no question in it (one per line)")
    if e.sets is None:
        return
    if not OmegaConf.is_list(e.sets):
        raise ConfigError(
            f"eval.sets={e.sets}: must be a list of set names (domain, general, unseen) or null"
        )
    provided = held_out_sets(cfg)
    needs = {
        "domain": "data.eval_path=FILE or data.eval_fraction > 0",
        "general": "data.general.eval_path=FILE",
        "unseen": "data.unseen.eval_path=FILE",
    }
    for name in e.sets:
        if name not in needs:
            raise ConfigError(f"eval.sets: unknown set {name!r}; the sets are {', '.join(needs)}")
        if name not in provided:
            raise ConfigError(
                f"eval.sets: {name!r} is named, but the data has no {name} held-out set (set {needs[name]})"
            )


def resume_fingerprint(cfg: DictConfig, world_size: int) -> dict:
    """What a resumed run must share with the checkpoint: the model, precision, data order, batch geometry."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for key in ("num_proc", "cache_dir", "prompts"):  # how, or what is asked, not what is trained on
        data.pop(key, None)
    data["general"].pop("prompts", None)
    data.pop("unseen", None)  # evaluated only
    b = cfg.batch
    sequences = b.global_batch_size or b.micro_batch_size * grad_accum_steps(cfg, world_size) * world_size
    return {
        "model": {
            "name_or_path": cfg.model.name_or_path,
            "config_overrides": dict(cfg.model.config_overrides),
        },
        "precision": cfg.precision,
        "data order": {"seed": cfg.seed, "data": data},
        "batch geometry": {"sequences per step": sequences, "max_seq_length": b.max_seq_length},
    }


def _differences(saved, now, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now)):
            out += _differences(saved.get(key), now.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if saved == now else [f"{prefix}: checkpoint {saved!r}, now {now!r}"]


def validate_resume(cfg: DictConfig, world_size: int) -> None:
    """The checkpoint to resume from exists and fits this config (files are verified after start-up)."""
    path = cfg.resume.path
    if path == "auto":
        found = complete_checkpoints(Path(cfg.run_dir))
        if not found:
            return  # nothing yet: a fresh start (the first attempt of an elastic run)
        folder = found[-1]
    else:
        folder = Path(path)
        if not (folder / "meta.json").is_file():
            raise ConfigError(f"resume.path={path}: not a checkpoint folder (no meta.json)")
        if not (folder / "COMPLETE.json").is_file():
            raise ConfigError(f"resume.path={path}: no COMPLETE.json; the checkpoint was not completed")
    saved = json.loads((folder / "meta.json").read_text()).get("fingerprint", {})
    now = resume_fingerprint(cfg, world_size)
    for part in ("model", "precision"):
        diff = _differences(saved.get(part), now[part], part)
        if diff:
            raise ConfigError(f"resume: {folder} is another {part}: {diff[0]}")
    if not cfg.resume.allow_config_change:
        for part in ("data order", "batch geometry"):
            diff = _differences(saved.get(part), now[part])
            if diff:
                raise ConfigError(
                    f"resume: {folder} was trained with another {part} ({diff[0]}); resuming would silently "
                    "change it; pass resume.allow_config_change=true to accept"
                )


def check_same_config(cfg: DictConfig, gather: Callable[[object], list]) -> None:
    """Every rank composed the same config, or a ConfigError naming the first key that differs.

    Each node composes its own (its checkout, its command line); two that differ would run apart
    and hang later. `gather` (all ranks call it) returns one value from every rank, in rank order:
    the hashes first, and only when they differ, the configs themselves.
    """
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    digests = gather(hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest())
    if len(set(digests)) == 1:
        return
    views = gather(flat)
    rank = next(r for r, digest in enumerate(digests) if digest != digests[0])
    key = next(k for k in sorted(set(views[0]) | set(views[rank])) if views[0].get(k) != views[rank].get(k))
    raise ConfigError(
        f"{key}: rank 0 has {views[0].get(key, '(unset)')!r}, rank {rank} has "
        f"{views[rank].get(key, '(unset)')!r}; every node must compose the same config (the same "
        "checkout and the same overrides)"
    )


def _flatten(tree: object, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
