"""Refuse bad input before anything heavy starts.

The schema (config/schema.py) refused unknown keys and values of the wrong type while the config was
composed. Here: the ranges of the numbers (RANGES), the words a key takes (CHOICES), the checks that
span several keys, and what the file system must hold.

Every error is a `ConfigError` whose one-line message names the key that is wrong. It is raised
before the process group exists or a model is touched, and before anything is written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from config.compose import ConfigError, grad_accum_steps, model_config_source, shown
from data.sources import BUILDERS, HUB_ID, read_questions
from fsdp import activation
from fsdp.adamw import IMPLS
from fsdp.checkpoint import CheckpointError, complete_checkpoints, other_timeline, read_meta
from fsdp.dist import device_type, replicate_degree, shared_gpu
from fsdp.precision import DTYPES, PRECISIONS
from fsdp.rundir import LOCK_NAME, run_dir_problem

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


def is_number(value: object) -> bool:
    """int or float; Python counts True as the int 1, but `true` is no batch size."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Number:
    """A finite number from `low` to `high`. The schema has made it a number already (`whole`: an
    int; `nullable`: or null), and the two flags say so in the message; a test holds them to it.

    nan and inf are refused outright: nan passes every `value <= 0` test, and neither is a size."""

    low: float | None = None
    high: float | None = None
    above: bool = False  # low itself is refused: > low
    below: bool = False  # high itself is refused: < high
    whole: bool = False
    nullable: bool = False
    unit: str = ""  # "ranks": "a whole number of ranks > 0"
    note: str = ""  # what null or an edge value means; a nullable key's note says what null does

    def problem(self, value: float | None) -> str | None:
        if value is None:
            return None
        if not math.isfinite(value):
            return self.expected(say_kind=True)
        too_low = self.low is not None and (value <= self.low if self.above else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.below else value > self.high)
        return self.expected(say_kind=self.whole) if too_low or too_high else None

    def expected(self, say_kind: bool) -> str:
        if self.low is not None and self.high is not None:
            bound = f"in {'(' if self.above else '['}{self.low}, {self.high}{')' if self.below else ']'}"
        elif self.low is not None:
            bound = f"{'>' if self.above else '>='} {self.low}"
        else:
            bound = f"{'<' if self.below else '<='} {self.high}"
        kind = ""
        if say_kind and self.whole:
            kind = f"a whole number of {self.unit} " if self.unit else "a whole number "
        elif say_kind:
            kind = "a number "
        tail = f" ({self.note})" if self.note else (", or null" if self.nullable else "")
        return f"must be {kind}{bound}{tail}"


class Betas:
    def problem(self, value: list[float]) -> str | None:
        if len(value) == 2 and all(0 <= beta < 1 for beta in value):
            return None
        return "must be two numbers, each in [0, 1) (e.g. [0.9, 0.95])"


# The range of every number (config/schema.py has made each a number of its type already).
RANGES = {
    # The loader seeds torch.Generator with seed * 100_003 + epoch, which must fit in 64 bits.
    "seed": Number(low=0, high=2**32 - 1, whole=True),
    "data.eval_fraction": Number(low=0, high=1, below=True),
    "data.max_train_examples": Number(low=0, above=True, whole=True, nullable=True),
    "data.num_proc": Number(low=0, above=True, whole=True, nullable=True, unit="processes"),
    "data.general.fraction": Number(low=0, high=1, below=True),
    "activation_checkpointing.every_k": Number(low=0, above=True, whole=True),
    "fsdp.explicit_prefetch": Number(low=0, whole=True, unit="units", note="0: FSDP2's implicit prefetch"),
    "batch.micro_batch_size": Number(low=0, above=True, whole=True),
    "batch.grad_accum_steps": Number(low=0, above=True, whole=True),
    "batch.global_batch_size": Number(
        low=0, above=True, whole=True, nullable=True, note="null: micro_batch_size x grad_accum_steps x ranks"
    ),
    "batch.max_seq_length": Number(low=0, above=True, whole=True),
    "optim.lr": Number(low=0, above=True),
    "optim.betas": Betas(),
    "optim.eps": Number(low=0, above=True),
    "optim.weight_decay": Number(low=0, note="0: no decay"),
    "optim.max_grad_norm": Number(low=0, nullable=True, note="0 or null: no clipping"),
    "schedule.warmup_steps": Number(
        low=0, whole=True, nullable=True, note="null: schedule.warmup_ratio of the steps"
    ),
    "schedule.warmup_ratio": Number(low=0, high=1),
    "schedule.min_lr_ratio": Number(low=0, high=1),
    "train.epochs": Number(low=0, above=True, whole=True),
    "train.max_steps": Number(low=0, above=True, whole=True, nullable=True),
    "train.log_every": Number(low=0, above=True, whole=True),
    "eval.every_steps": Number(low=0, above=True, whole=True, nullable=True),
    "eval.max_examples": Number(low=0, above=True, whole=True, nullable=True),
    "eval.micro_batch_size": Number(low=0, above=True, whole=True, nullable=True),
    "eval.max_new_tokens": Number(low=0, whole=True, note="0: no generations"),
    "eval.own_answers.max_new_tokens": Number(low=0, above=True, whole=True),
    "checkpoint.every_steps": Number(low=0, above=True, whole=True, nullable=True),
    "checkpoint.keep_last": Number(low=0, above=True, whole=True, nullable=True, note="null: keep all"),
    "loss.chunk_tokens": Number(low=0, above=True, whole=True),
    "comm.init_timeout_s": Number(low=0, above=True),
    "comm.train_timeout_s": Number(low=0, above=True),
    "metrics.peak_tflops": Number(
        low=0, above=True, nullable=True, note="null: the GPU table in fsdp/flops.py"
    ),
    "memory.world_size": Number(low=0, above=True, whole=True, unit="ranks"),
    "memory.nodes": Number(low=0, above=True, whole=True, unit="nodes"),
    "memory.fit_gib": Number(low=0, above=True, nullable=True, note="GiB per rank; null: no planning"),
    "export.max_shard_mb": Number(low=0, above=True),
}


def validate_values(cfg: DictConfig) -> None:
    """Every required key set, each number's range (RANGES), each choice (CHOICES), before any check
    or program computes with them. Read as plain dicts: key by key, a DictConfig is ~10x slower,
    and the table tests validate hundreds of configs."""
    try:
        tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key}: required and not set (e.g. {err.full_key}=...)") from None
    for key, rule in RANGES.items():
        value = value_at(tree, key)
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{key}={shown(value)}: {problem}")
    for key, allowed in CHOICES.items():
        value = value_at(tree, key)
        if value not in allowed:
            names = ("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"{key}={shown(value)}: must be one of {', '.join(names)}")


def value_at(tree: dict, key: str) -> object:
    """The value at a dotted key of the config as plain dicts (the schema keeps every key)."""
    return functools.reduce(lambda node, part: node[part], key.split("."), tree)


# Full fine-tuning nudges weights that already work; far above the usual 1e-5 to 5e-5, the
# first steps can overwrite what the model knew. A randomly initialized model is not fine-tuned.
HIGH_FINE_TUNING_LR = 1e-3


def dubious_values(cfg: DictConfig) -> list[str]:
    """Legal values that are likely mistakes, one line each: the run prints them once and goes on.
    Call after validate(); reads the model's config.json if it is on disk, downloads nothing."""
    if cfg.model.random_init:
        return []
    found = []
    if cfg.optim.lr > HIGH_FINE_TUNING_LR:
        found.append(
            f"optim.lr={shown(cfg.optim.lr)}: high for full fine-tuning of a pretrained model (1e-5 to "
            "5e-5 is usual); the first steps can overwrite what it knew"
        )
    positions = trained_positions(cfg)
    if positions is not None and cfg.batch.max_seq_length > positions:
        found.append(
            f"batch.max_seq_length={cfg.batch.max_seq_length}: longer than the {positions} positions "
            f"{cfg.model.name_or_path} was trained on (max_position_embeddings); past them its "
            "attention is untested"
        )
    return found


def trained_positions(cfg: DictConfig) -> int | None:
    """The model's max_position_embeddings (n_positions in GPT-2), with model.config_overrides;
    None when its config.json is not on disk or does not say."""
    source = model_config_source(cfg)
    if source is None:
        return None
    try:
        hf_config = json.loads((source / "config.json" if source.is_dir() else source).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(hf_config, dict):
        return None
    hf_config.update(OmegaConf.to_container(cfg.model.config_overrides))
    for key in ("max_position_embeddings", "n_positions"):
        if is_number(hf_config.get(key)):
            return int(hf_config[key])
    return None


def is_local_path(name_or_path: str) -> bool:
    return (
        Path(name_or_path).exists()
        or name_or_path.startswith((".", "/", "~"))
        or not HUB_ID.match(name_or_path)
    )


def validate_estimate(cfg: DictConfig) -> None:
    """estimate.py and explain.py: the common checks, a world size, a budget if any, and the model's
    config.json offline. They read no data and write no run folder."""
    validate_common(cfg, OmegaConf.select(cfg, "memory.world_size"))  # checked there before it is used
    studied = cfg.memory
    if studied.world_size % studied.nodes:
        raise ConfigError(
            f"memory.nodes={studied.nodes}: must be a whole number of nodes dividing {studied.world_size} ranks"
        )
    validate_mesh(cfg, studied.world_size, studied.world_size // studied.nodes)
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
    problem = run_dir_problem(run_dir)  # the root, a home, a checkout, or a user's files in it
    if problem:
        raise ConfigError(problem)
    if cfg.resume.path is not None:
        validate_resume(cfg, world_size)
    elif run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir()) and not cfg.overwrite:
        raise ConfigError(
            f"run_dir={cfg.run_dir}: already holds a run; pass resume=auto to continue it, overwrite=true "
            f"to write over it, or choose another run_dir (or name)"
        )


def validate_common(cfg: DictConfig, world_size: int) -> None:
    """What every program reads: required keys, choices, positive sizes, the batch geometry."""
    validate_values(cfg)
    if cfg.fsdp.cpu_offload and cfg.device == "cpu":
        raise ConfigError("fsdp.cpu_offload=true: only meaningful with device=cuda")
    replicate = cfg.fsdp.replicate  # the schema takes anything here: a word or a number
    if replicate != "auto" and (
        not isinstance(replicate, int) or isinstance(replicate, bool) or replicate < 1
    ):
        raise ConfigError(
            f"fsdp.replicate={shown(replicate)}: must be auto or a whole number of replicas >= 1"
        )
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
    if device == "cuda":
        shared = shared_gpu(
            local_world_size, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        if shared:
            raise ConfigError(shared)
    validate_mesh(cfg, world_size, local_world_size)


def validate_mesh(cfg: DictConfig, world_size: int, local_world_size: int) -> None:
    """fsdp.replicate, resolved as the run resolves it (auto: one replica per node), divides the ranks."""
    replicas = replicate_degree(cfg.fsdp.replicate, world_size, local_world_size)
    if world_size % replicas:
        raise ConfigError(
            f"fsdp.replicate={cfg.fsdp.replicate}: {replicas} replicas do not divide the {world_size} ranks"
        )


def validate_speed_levers(cfg: DictConfig) -> None:
    if cfg.compile and device_type(cfg.device) == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
        raise ConfigError(
            "compile=true: torch.compile on CPU (inductor) needs a C++ compiler, and neither $CXX nor g++ "
            "is on PATH; install one or pass compile=false"
        )


def validate_state_dtype(cfg: DictConfig) -> None:
    """optim.state_dtype against what AdamW can do with it (fsdp/adamw.py says why of each)."""
    optim = cfg.optim
    if optim.state_dtype is None:
        return
    storage = "bf16" if cfg.precision == "bf16" else "fp32"  # auto is mixed or fp32: fp32 weights
    if optim.state_dtype == "fp32" and storage == "bf16":
        raise ConfigError(
            "optim.state_dtype=fp32: wider than the bf16 parameters of precision=bf16, which AdamW "
            "updates in their own dtype; use null (or precision=mixed for fp32 weights and state)"
        )
    if optim.state_dtype != storage and optim.impl == "fused":
        raise ConfigError(
            f"optim.state_dtype={optim.state_dtype}: optim.impl=fused runs torch's fused kernel, which needs m "
            f"and v in the parameters' dtype ({storage}); use optim.impl=loop or foreach"
        )
    smallest = torch.finfo(DTYPES[optim.state_dtype]).eps / 2  # half an ulp, relative: 2^-8 for bf16
    if optim.state_dtype != storage and any(1 - beta < smallest for beta in optim.betas):
        raise ConfigError(
            f"optim.state_dtype={optim.state_dtype}: optim.betas={list(optim.betas)} move m or v by less than "
            f"{smallest:.2g} of the way per step, which {optim.state_dtype} rounds away (at 0.999, v never "
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
    shipped = " (the shipped tasks: run `make data`)" if ".cache/data" in data.path else ""
    is_hub_name = HUB_ID.match(data.path) and Path(data.path).suffix not in BUILDERS
    if not Path(data.path).exists() and not is_hub_name:
        raise ConfigError(f"data.path={data.path}: no such file or folder{shipped}")
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
    """eval.sets names only sets the data has; no prompt is blank."""
    evaluation = cfg.eval
    for key in ("data.prompts", "data.general.prompts"):
        value = OmegaConf.select(cfg, key)
        if not all(prompt.strip() for prompt in value):
            raise ConfigError(f"{key}={list(value)}: must be a list of non-empty strings")
    own = evaluation.own_answers
    if own.prompts is not None and Path(own.prompts).is_file() and not read_questions(own.prompts):
        raise ConfigError(f"eval.own_answers.prompts={own.prompts}: no question in it (one per line)")
    if evaluation.sets is None:
        return
    provided = held_out_sets(cfg)
    needs = {
        "domain": "data.eval_path=FILE or data.eval_fraction > 0",
        "general": "data.general.eval_path=FILE",
        "unseen": "data.unseen.eval_path=FILE",
    }
    for name in evaluation.sets:
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
    batch = cfg.batch
    sequences = (
        batch.global_batch_size or batch.micro_batch_size * grad_accum_steps(cfg, world_size) * world_size
    )
    return {
        "model": {
            "name_or_path": cfg.model.name_or_path,
            "config_overrides": dict(cfg.model.config_overrides),
        },
        "precision": cfg.precision,
        "data order": {"seed": cfg.seed, "data": data},
        "batch geometry": {"sequences per step": sequences, "max_seq_length": batch.max_seq_length},
    }


def _differences(saved, now, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now)):
            out += _differences(saved.get(key), now.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if saved == now else [f"{prefix}: checkpoint {saved!r}, now {now!r}"]


def _checkpoint_to_resume(cfg: DictConfig) -> tuple[Path, dict] | None:
    """The checkpoint resume.path names and its meta.json; for auto, the newest whose meta.json reads
    (the ranks verify the files after start-up, pass over damaged ones and stop, naming each, if
    none is left), or None if run_dir holds none."""
    path = cfg.resume.path
    if path == "auto":
        for folder in reversed(complete_checkpoints(Path(cfg.run_dir))):
            with contextlib.suppress(CheckpointError):
                return folder, read_meta(folder)
        return None
    folder = Path(path)
    if not (folder / "meta.json").is_file():
        raise ConfigError(f"resume.path={path}: not a checkpoint folder (no meta.json)")
    if not (folder / "COMPLETE.json").is_file():
        raise ConfigError(f"resume.path={path}: no COMPLETE.json; the checkpoint was not completed")
    try:
        meta = read_meta(folder)
    except CheckpointError as err:
        raise ConfigError(f"resume.path={path}: {err}") from None
    # One run_dir, one line of checkpoints: see fsdp/checkpoint.py other_timeline.
    others = other_timeline(Path(cfg.run_dir), folder, meta["step"])
    if others and not cfg.overwrite:
        raise ConfigError(
            f"resume.path={path} (step {meta['step']}): run_dir={cfg.run_dir} holds checkpoints of "
            f"another timeline ({', '.join(p.name for p in others)}) that resume=auto and keep_last "
            "would mix with this run's; pass overwrite=true to remove them (and its summary.json) "
            "first, or choose another run_dir"
        )
    return folder, meta


def validate_resume(cfg: DictConfig, world_size: int) -> None:
    """The checkpoint to resume from exists and fits this config (files are verified after start-up)."""
    found = _checkpoint_to_resume(cfg)
    if found is None:
        return  # nothing yet: a fresh start (the first attempt of an elastic run)
    folder, meta = found
    saved = meta.get("fingerprint", {})
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
