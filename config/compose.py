"""Compose the run's configuration with Hydra, from conf/ and `key=value` overrides.

We use Hydra's compose API rather than `@hydra.main`: under torchrun every rank runs this code,
and `@hydra.main` would give each rank its own clock-named output folder and change directory.
Here the run folder is a config key, so all ranks agree on it by construction.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

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
    # Hydra's parser refuses an unquoted `~`; quoted, run_dir=~/x reaches the expansion below.
    overrides = [
        f"run_dir='{o.partition('=')[2]}'" if o.startswith("run_dir=~") and "'" not in o else o
        for o in overrides
    ]
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
        # An interpolation that cannot resolve (`optim.lr=${oc.env:LR}` with LR unset) fails
        # here, naming its key, rather than wherever the value is first read.
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        first_line = str(err).strip().splitlines()[0]
        raise ConfigError(f"{err.full_key}: {first_line}" if err.full_key else first_line) from None
    except (HydraException, ValueError) as err:  # ValueError: `data.prompts.x=1`, a list's index
        raise ConfigError(hydra_problem(err, overrides)) from None
    # run_dir=~/runs/x: the home folder for every reader of run_dir (the checks, the lock, each
    # writer), not a folder named "~" in the checkout; so it is expanded once, here. (Bash expands
    # run_dir=~/x itself; sh, a subprocess or a quoted run_dir='~/x' pass the `~` on.)
    if isinstance(cfg.run_dir, str) and cfg.run_dir.startswith("~"):
        cfg.run_dir = os.path.expanduser(cfg.run_dir)
    return cfg


def hydra_problem(err: Exception, overrides: list[str]) -> str:
    """One line for what Hydra refused. Its messages name neither the unknown key's fix nor the
    override it could not parse; the second is found by parsing each override alone."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    first_line = str(err).strip().splitlines()[0]
    unknown = re.fullmatch(r"Could not override '(.+)'\.", first_line)
    if unknown:
        return f"{unknown[1]}: no such key (conf/config.yaml has them all)"
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException:
            return f"{override}: Hydra cannot read this value ({first_line}); quote a string: key='...'"
    return f"{first_line} (overrides: {' '.join(overrides)})"


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
