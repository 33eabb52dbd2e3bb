"""Compose the run's configuration with Hydra, from conf/ and `key=value` overrides.

We use Hydra's compose API rather than `@hydra.main`: under torchrun every rank runs this code,
and `@hydra.main` would give each rank its own clock-named output folder and change directory.
Here the run folder is a config key, so all ranks agree on it by construction.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from fsdp.dist import device_type
from fsdp.precision import PRECISIONS, choose_precision

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "data", "preset")
# Keys that once turned train.py into another program; each program has its own entry point now.
PROGRAMS = {
    "memory.estimate": "python estimate.py (make estimate)",
    "explain": "python explain.py (make explain)",
}


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_config(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with command-line style `key=value` overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # `resume=auto` and `resume=PATH` are what people type; the key is resume.path.
    overrides = [f"resume.path={o.partition('=')[2]}" if o.startswith("resume=") else o for o in overrides]
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ConfigError(f"{override!r}: overrides are key=value (e.g. model=tiny, optim.lr=1e-5)")
        if key in GROUPS and value not in group_options(key):
            raise ConfigError(f"{key}={value}: unknown {key}; choose one of: {', '.join(group_options(key))}")
        if key in PROGRAMS:
            raise ConfigError(f"{override}: this is a program of its own now: {PROGRAMS[key]}")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        first_line = str(err).strip().splitlines()[0]
        raise ConfigError(first_line) from None
    return cfg


def world_size_from_env() -> int:
    """The world size torchrun will give us; known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def grad_accum_steps(cfg: DictConfig, world_size: int) -> int:
    """Micro-batches per optimizer step: given, or derived from batch.global_batch_size."""
    b = cfg.batch
    if b.global_batch_size is None:
        return int(b.grad_accum_steps)
    per_micro_step = b.micro_batch_size * world_size
    if b.global_batch_size % per_micro_step:
        raise ConfigError(
            f"batch.global_batch_size={b.global_batch_size} does not divide into micro_batch_size "
            f"{b.micro_batch_size} x world size {world_size} = {per_micro_step} sequences per micro-step"
        )
    return b.global_batch_size // per_micro_step


def model_config_source(cfg: DictConfig) -> Path | None:
    """Where the model's config.json is on disk: its folder, else model.config_file; None if neither."""
    folder = Path(cfg.model.name_or_path).expanduser()
    if (folder / "config.json").is_file():
        return folder
    if cfg.model.config_file is not None and Path(cfg.model.config_file).is_file():
        return Path(cfg.model.config_file)
    return None


def resolve_precision(cfg: DictConfig, device: str | None = None) -> str:
    """Turn `precision=auto` into the mode this device runs well (fsdp/precision.py), in place;
    returns the one line that says which and why. `device`: the target's type (cuda for the
    programs that study a GPU run); default, what `device=` picks on this machine."""
    if cfg.precision != "auto" and cfg.precision not in PRECISIONS:
        return str(cfg.precision)  # validate() names the bad value
    cfg.precision, reason = choose_precision(cfg.precision, device or device_type(cfg.device))
    return reason
