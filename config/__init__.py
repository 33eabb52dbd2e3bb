"""The run's configuration: composed from conf/ with Hydra, checked, and handed out as typed settings.

    schema.py    each key's type, and what it means in a docstring under it: the dataclasses
                 Hydra composes onto, so an unknown key or a value of the wrong type is refused
    compose.py   conf/ + `key=value` overrides -> one typed DictConfig (Hydra's compose API)
    validate.py  every bad value refused up front, in one line naming the key, before any process
                 group, model or file exists: ranges, choices, checks across keys and files;
                 what a resume must share with its checkpoint
    settings.py  the dataclasses the mechanisms take (BuildSettings, Workload, ...), built once
    banner.py    the startup banner: what the config asked for, and what it became

This package may import fsdp/ and data/; they never import it.
"""

from config.compose import (
    CONF_DIR,
    ConfigError,
    grad_accum_steps,
    group_options,
    load_config,
    model_config_source,
    resolve_precision,
    world_size_from_env,
)
from config.validate import (
    check_same_config,
    dubious_values,
    resume_fingerprint,
    validate,
    validate_estimate,
)

__all__ = [
    "CONF_DIR",
    "ConfigError",
    "check_same_config",
    "dubious_values",
    "grad_accum_steps",
    "group_options",
    "load_config",
    "model_config_source",
    "resolve_precision",
    "resume_fingerprint",
    "validate",
    "validate_estimate",
    "world_size_from_env",
]
