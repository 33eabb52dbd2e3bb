"""Compose the run's configuration with Hydra, from conf/ and `key=value` overrides.

We use Hydra's compose API rather than `@hydra.main`: under torchrun every rank runs this code,
and `@hydra.main` would give each rank its own clock-named output folder and change directory.
Here the run folder is a config key, so all ranks agree on it by construction.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from config.schema import declared_type, expected_type, field_types, register_schema
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
    """Compose conf/config.yaml with command-line style `key=value` overrides, into the typed nodes
    of config/schema.py: an unknown key or a value of the wrong type is a one-line ConfigError."""
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
        problem = override_problem(override)
        if problem:
            raise ConfigError(problem)
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
        # An interpolation that cannot resolve (`optim.lr=${oc.env:LR}` with LR unset) fails
        # here, naming its key, rather than wherever the value is first read.
        OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException, ValueError) as err:  # Hydra raises a bare ValueError too
        raise ConfigError(composition_problem(err, overrides)) from None
    # run_dir=~/runs/x: the home folder for every reader of run_dir (the checks, the lock, each
    # writer), not a folder named "~" in the checkout; so it is expanded once, here. (Bash expands
    # run_dir=~/x itself; sh, a subprocess or a quoted run_dir='~/x' pass the `~` on.)
    if cfg.run_dir.startswith("~"):
        cfg.run_dir = os.path.expanduser(cfg.run_dir)
    return cfg


def override_problem(override: str) -> str | None:
    """What is wrong with one command-line override before Hydra sees it, or None."""
    key, sep, value = override.partition("=")
    if key.startswith("~"):
        if not in_mapping(key.lstrip("~")):
            return f"{override}: a key cannot be removed (config/schema.py has each); set it instead"
        return None
    if not sep:
        return f"{override!r}: overrides are key=value (e.g. model=tiny, optim.lr=1e-5)"
    if key in GROUPS and value not in group_options(key):
        return f"{key}={value}: unknown {key}; choose one of: {', '.join(group_options(key))}"
    if key in PROGRAMS:
        return f"{override}: this is a program of its own now: {PROGRAMS[key]}"
    bare = key.lstrip("+")  # +key adds a key, which only a mapping (model.config_overrides) takes
    if declared_type(bare) is None and bare not in GROUPS:
        return unknown_key(bare)
    if key.startswith("+") and not key.startswith("++") and not in_mapping(bare):
        return f"{override}: {bare} is a key already; set it without the +: {bare}={value}"
    return value_problem(bare, value)


def in_mapping(key: str) -> bool:
    """An entry of a mapping (model.config_overrides.hidden_size): its keys are not the schema's."""
    return typing.get_origin(declared_type(key.rpartition(".")[0])) is dict


def value_problem(key: str, text: str) -> str | None:
    """What OmegaConf would convert without a word but nobody means: `1`, `yes` or `on` for true
    (it takes them all), or the word true for a path (it becomes the string "True")."""
    annotation = declared_type(key)
    word = text.lower()
    if text.startswith("${"):  # an interpolation: its result is checked when it resolves
        return None
    if annotation is bool and word not in ("true", "false"):
        return f"{key}={text}: must be true or false"
    if annotation in (str, str | None) and word in ("true", "false"):
        return f"{key}={text}: {expected_type(key)} (for the word itself, quote it: {key}='{text}')"
    return None


def unknown_key(key: str, source: str = "") -> str:
    """`source`: the file that sets it, if not the command line."""
    close = difflib.get_close_matches(key, field_types(), n=1, cutoff=0.8)  # typos, not any key
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{key}: no such key{hint} ({f'in {source}; ' if source else ''}config/schema.py has them all)"


def composition_problem(err: Exception, overrides: list[str]) -> str:
    """One line for what Hydra or the schema refused: the key, the value as typed where an
    override gave it, the file where a group or preset did."""
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        KeyValidationError,
        OmegaConfBaseException,
        ValidationError,
    )

    # Hydra raises its own exception from OmegaConf's, which names the key.
    cause = err if isinstance(err, OmegaConfBaseException) else (err.__cause__ or err.__context__)
    if not isinstance(cause, OmegaConfBaseException) or not cause.full_key:
        return hydra_problem(err, overrides)
    key = cause.full_key
    in_file = re.match(r"In '([^']+)'", str(err))  # a group or preset file, not an override
    source = f"conf/{in_file[1]}.yaml" if in_file else ""
    where = f" (in {source})" if source else ""
    if isinstance(cause, ConfigAttributeError | ConfigKeyError):
        if in_mapping(key):
            return f"{key}: not set; add the entry with +{key}=..."
        return unknown_key(key, source)
    if isinstance(cause, ValidationError) and not isinstance(cause, KeyValidationError):
        field = re.sub(r"\[\d+\]", "", key)  # optim.betas[1]: the list as typed, if it was
        typed = [o.partition("=")[2] for o in overrides if o.partition("=")[0].lstrip("+") == field]
        if typed:
            return f"{field}={typed[-1]}: {expected_type(field)}{where}"
        return f"{key}={shown(cause.value)}: {expected_type(key)}{where}"
    return f"{key}: {str(cause).strip().splitlines()[0]}{where}"


def hydra_problem(err: Exception, overrides: list[str]) -> str:
    """One line for what Hydra refused. Its messages do not name the override it could not parse,
    so that one is found by parsing each override alone."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    first_line = str(err).strip().splitlines()[0]
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException:
            return f"{override}: Hydra cannot read this value ({first_line}); quote a string: key='...'"
    return f"{first_line} (overrides: {' '.join(overrides)})"


def shown(value: object) -> str:
    """A value as it is typed on the command line (null, true), on one line whatever it holds."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # the schema made `lr=0` 0.0: show it as it was typed
    text = str(value)
    return text if text.isprintable() else repr(text)


def world_size_from_env() -> int:
    """The world size torchrun will give us; known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def grad_accum_steps(cfg: DictConfig, world_size: int) -> int:
    """Micro-batches per optimizer step: given, or derived from batch.global_batch_size."""
    batch = cfg.batch
    if batch.global_batch_size is None:
        return int(batch.grad_accum_steps)
    per_micro_step = batch.micro_batch_size * world_size
    if batch.global_batch_size % per_micro_step:
        raise ConfigError(
            f"batch.global_batch_size={batch.global_batch_size} does not divide into micro_batch_size "
            f"{batch.micro_batch_size} x world size {world_size} = {per_micro_step} sequences per micro-step"
        )
    return batch.global_batch_size // per_micro_step


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
