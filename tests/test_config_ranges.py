"""Every value with a range or a type is checked up front: one line naming the key, never a traceback.

Composing with Hydra costs ~80 ms, so the tables here compose one config and set each value the way
Hydra parses it from the command line (its own override parser) into the typed config, as Hydra
merges an override; a few cases go through load_config itself, to show that the two agree.
"""

from __future__ import annotations

import typing

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import config
from config import ConfigError, load_config, resolve_precision, validate, validate_estimate
from config.compose import composition_problem, value_problem
from config.schema import declared_type, field_types
from config.validate import CHOICES, RANGES, Number

pytestmark = pytest.mark.fast  # in this process only: the fast tier (make test-fast)

# key -> [(value as typed on the command line, a fragment of the one-line refusal)]
BAD = {
    "seed": [
        ("-1", "must be a whole number in [0, 4294967295]"),
        ("1.5", "whole number"),
        ("4294967296", "whole number in"),
    ],
    "optim.lr": [
        ("0", "must be > 0"),
        ("-1e-5", "must be > 0"),
        ("abc", "must be a number"),
        ("nan", "> 0"),
    ],
    "optim.eps": [("0", "must be > 0"), ("-1e-8", "must be > 0")],
    "optim.weight_decay": [("-0.1", "must be >= 0")],
    "optim.max_grad_norm": [("-1", "must be >= 0 (0 or null: no clipping)"), ("inf", ">= 0")],
    "optim.betas": [
        ("[0.9,1.0]", "must be two numbers, each in [0, 1)"),
        ("[-0.1,0.95]", "each in [0, 1)"),
        ("0.9", "must be a list of numbers"),
        ("[0.9]", "must be two numbers"),
        ("[0.9,abc]", "must be a list of numbers"),
    ],
    "schedule.warmup_steps": [("-3", "must be a whole number >= 0"), ("1.5", "whole number")],
    "schedule.warmup_ratio": [("-0.1", "must be in [0, 1]"), ("1.5", "must be in [0, 1]")],
    "schedule.min_lr_ratio": [("-0.1", "must be in [0, 1]"), ("2", "must be in [0, 1]")],
    "batch.micro_batch_size": [
        ("0", "must be a whole number > 0"),
        ("true", "whole number"),
        ("1.5", "whole"),
    ],
    "batch.grad_accum_steps": [("0", "must be a whole number > 0"), ("-2", "whole number > 0")],
    "batch.global_batch_size": [("0", "must be a whole number > 0"), ("-4", "> 0"), ("5", "does not divide")],
    "batch.max_seq_length": [("0", "must be a whole number > 0"), ("128.5", "whole number")],
    "train.epochs": [("0", "must be a whole number > 0"), ("1.5", "whole number")],
    "train.max_steps": [("0", "must be a whole number > 0"), ("1.5", "must be a whole number, or null")],
    "train.log_every": [("0", "must be a whole number > 0"), ("-1", "whole number > 0")],
    "eval.every_steps": [("0", "must be a whole number > 0, or null")],
    "eval.max_examples": [("-5", "must be a whole number > 0")],
    "eval.micro_batch_size": [("0", "must be a whole number > 0, or null")],
    "eval.max_new_tokens": [("-1", "must be a whole number >= 0"), ("2.5", "must be a whole number")],
    "eval.own_answers.max_new_tokens": [("0", "must be a whole number > 0")],
    "checkpoint.every_steps": [("0", "must be a whole number > 0, or null")],
    "checkpoint.keep_last": [("0", "must be a whole number > 0")],
    "loss.chunk_tokens": [("0", "must be a whole number > 0")],
    "comm.init_timeout_s": [("0", "must be > 0"), ("inf", "> 0")],
    "comm.train_timeout_s": [("-1", "must be > 0")],
    "metrics.peak_tflops": [("0", "must be > 0"), ("-5", "> 0")],
    "memory.world_size": [("0", "must be a whole number of ranks > 0")],
    "memory.nodes": [("0", "must be a whole number of nodes > 0")],
    "memory.fit_gib": [("0", "must be > 0"), ("-1", "> 0")],
    "export.max_shard_mb": [("0", "must be > 0"), ("-100", "> 0")],
    "data.num_proc": [("0", "must be a whole number of processes > 0"), ("1.5", "whole number")],
    "data.eval_fraction": [("1", "must be in [0, 1)"), ("-0.1", "[0, 1)")],
    "data.general.fraction": [("1.5", "must be in [0, 1)"), ("-0.2", "[0, 1)")],
    "data.max_train_examples": [("0", "must be a whole number > 0, or null")],
    "activation_checkpointing.every_k": [("0", "must be a whole number > 0"), ("1.5", "whole number")],
    "fsdp.explicit_prefetch": [("-1", "must be a whole number of units >= 0"), ("true", "whole number")],
    "fsdp.replicate": [("0", "must be auto or a whole number of replicas >= 1"), ("true", "auto or")],
}


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def numeric(annotation: object) -> bool:
    """int or float, or either of them or null."""
    return annotation in (int, float, int | None, float | None)


def test_every_numeric_key_has_a_range_and_a_bad_value_in_the_table():
    numbers = {key for key, annotation in field_types().items() if numeric(annotation)}
    ranged = {key for key, rule in RANGES.items() if isinstance(rule, Number)}
    assert sorted(numbers ^ ranged) == []
    assert sorted(numbers - set(BAD)) == []
    assert sorted(set(BAD) - set(field_types())) == []  # no typo in the table


def test_each_range_says_what_the_schema_takes():
    """A Number's `whole` and `nullable` are the schema's int and `| None`: its messages say them."""
    for key, rule in RANGES.items():
        if isinstance(rule, Number):
            annotation = field_types()[key]
            assert rule.whole == (annotation in (int, int | None)), key
            assert rule.nullable == (annotation in (int | None, float | None)), key


PARSER = OverridesParser.create()


def as_parsed(text: str) -> object:
    """A command-line value as Hydra hands it over: int, float, bool, None, str, list or dict."""
    return PARSER.parse_override(f"key={text}").value()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> DictConfig:
    run_dir = tmp_path_factory.mktemp("ranges") / "run"
    return load_config(["preset=tiny", f"run_dir={run_dir}"])


def refusal_of(cfg: DictConfig, key: str, text: str, check=None) -> str | None:
    """Set key to the parsed value as load_config would (its checks of the text, then the schema's
    when the value is set), check the config as train.py does (estimate.py's checks with
    check=validate_estimate), put the old value back; the refusal's message, or None if accepted."""
    problem = value_problem(key, text)
    if problem:
        return problem
    old, precision = OmegaConf.select(cfg, key), cfg.precision
    if OmegaConf.is_config(old):
        old = OmegaConf.to_container(old)  # a copy: a typed list node takes a new value in place
    try:
        OmegaConf.update(cfg, key, as_parsed(text), merge=False)
        if check is validate_estimate:
            resolve_precision(cfg, "cuda")
            validate_estimate(cfg)
        else:
            resolve_precision(cfg)
            validate(cfg, 1)
        return None
    except OmegaConfBaseException as err:
        return composition_problem(err, [f"{key}={text}"])
    except ConfigError as err:
        return str(err)
    finally:
        OmegaConf.update(cfg, key, old, merge=False)
        cfg.precision = precision


CASES = [(key, text, fragment) for key, bad in BAD.items() for text, fragment in bad]


@pytest.mark.parametrize(("key", "text", "fragment"), CASES, ids=[f"{k}={t}" for k, t, _ in CASES])
def test_a_value_out_of_range_is_one_line_naming_the_key(base, key, text, fragment):
    message = refusal_of(base, key, text)
    assert message is not None, f"{key}={text} was accepted"
    assert message.startswith(f"{key}=") and "\n" not in message
    assert fragment in message


# nan and inf take the same path as -1 through Number (the table tries them on a few keys).
WEIRD = ["abc", "-1", "1.5", "true", "null", "[1,2]"]


def test_no_value_of_any_key_gives_a_traceback(base):
    """Whatever a key is given, it is accepted or refused in one line; a bool key takes only bools,
    a number key only numbers (or null where allowed)."""
    failures = []
    for key, annotation in field_types().items():
        if typing.get_origin(annotation) is dict or key == "memory.fit_gib":
            continue  # the model's own keys; fit_gib has its own test below
        for text in WEIRD:
            try:
                message = refusal_of(base, key, text)
            except Exception as err:  # the point: which ones escape
                failures.append(f"{key}={text}: {type(err).__name__}: {err}".splitlines()[0])
                continue
            value = as_parsed(text)
            if message is not None and "\n" in message:
                failures.append(f"{key}={text}: two lines: {message!r}")
            if message is None and annotation is bool and not isinstance(value, bool):
                failures.append(f"{key}={text}: accepted for a true/false key")
            if message is None and numeric(annotation) and not is_number(value) and value is not None:
                failures.append(f"{key}={text}: accepted for a numeric key")
    assert failures == []


def test_estimate_checks_its_own_keys(base):
    """memory.* as estimate.py reads them: refused in one line, never a traceback."""
    for key, text, fragment in [
        ("memory.world_size", "true", "memory.world_size=true: must be a whole number"),
        ("memory.world_size", "0", "memory.world_size=0: must be a whole number of ranks > 0"),
        ("memory.nodes", "3", "memory.nodes=3: must be a whole number of nodes dividing 8 ranks"),
        ("memory.fit_gib", "abc", "memory.fit_gib=abc: must be a number, or null"),
        ("memory.fit_gib", "-1", "memory.fit_gib=-1: must be > 0"),
    ]:
        message = refusal_of(base, key, text, check=validate_estimate)
        assert message is not None and message.startswith(fragment), (key, text, message)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=abc", "optim.lr=abc: must be a number"),
        ("optim.lr=${name}", "optim.lr=${name}: must be a number"),
        ("train.max_steps=1.5", "train.max_steps=1.5: must be a whole number, or null"),
        ("batch.micro_batch_size=2.5", "batch.micro_batch_size=2.5: must be a whole number"),
        ("batch.micro_batch_size=true", "batch.micro_batch_size=true: must be a whole number"),
        ("seed=null", "seed=null: must be a whole number"),
        ("optim.betas=0.9", "optim.betas=0.9: must be a list of numbers"),
        ("optim.betas=[0.9,abc]", "optim.betas=[0.9,abc]: must be a list of numbers"),
        ("overwrite=maybe", "overwrite=maybe: must be true or false"),
        ("overwrite=yes", "overwrite=yes: must be true or false"),  # OmegaConf alone would take it
        ("compile=2", "compile=2: must be true or false"),
        ("data.packing=[1]", "data.packing=[1]: must be true or false"),
        ("data.path=[1]", "data.path=[1]: must be a string"),
        ("data.path=null", "data.path=null: must be a string"),
        (
            "eval.cache_dir=false",
            "eval.cache_dir=false: must be a string, or null (for the word itself, quote",
        ),
        ("eval.sets=domain", "eval.sets=domain: must be a list of strings, or null"),
        ("model.config_overrides=5", "model.config_overrides=5: must be a mapping"),
        (
            "model.config_overrides.rope_theta=1",
            "model.config_overrides.rope_theta: not set; add the entry with +",
        ),
        ("optim=3", "optim=3: must be a group of keys (such as optim.lr), not one value"),
        ("optim.lr=${oc.env:NO_SUCH_VARIABLE}", "optim.lr: "),
        ("data.prompts=hello", "data.prompts=hello: must be a list of strings"),
        ("optim.nosuch=1", "optim.nosuch: no such key"),
        ("+optim.nosuch=1", "optim.nosuch: no such key"),
        ("+nosuch=1", "nosuch: no such key"),
        ("optim.weightdecay=0", "optim.weightdecay: no such key; did you mean optim.weight_decay?"),
        ("+optim.lr=1", "+optim.lr=1: optim.lr is a key already; set it without the +"),
        ("~optim", "~optim: a key cannot be removed"),
        ("~optim.lr", "~optim.lr: a key cannot be removed"),
        ("optim.betas=[0.9", "optim.betas=[0.9: Hydra cannot read this value"),
        ("data.prompts.x=1", "data.prompts.x: no such key"),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line(override, expected, tmp_path):
    """Through load_config, as train.py composes: what Hydra parses from the command line."""
    with pytest.raises(ConfigError) as refused:
        cfg = load_config(["preset=tiny", f"run_dir={tmp_path / 'run'}", override])
        resolve_precision(cfg)
        validate(cfg, 1)
    message = str(refused.value)
    assert message.startswith(expected) and "\n" not in message


def test_a_legal_but_dubious_value_is_one_warning_line():
    smol = ["model=smollm2-135m", "data=sample"]
    assert config.dubious_values(load_config(smol)) == []
    assert config.dubious_values(load_config(["preset=tiny", "optim.lr=0.01"])) == []  # random init
    (long,) = config.dubious_values(load_config([*smol, "batch.max_seq_length=16384"]))
    assert long.startswith("batch.max_seq_length=16384: longer than the 8192 positions") and "\n" not in long
    (fast,) = config.dubious_values(load_config([*smol, "optim.lr=0.01"]))
    assert fast.startswith("optim.lr=0.01: high for full fine-tuning") and "\n" not in fast
    # The model's config.json not on disk (a hub name, downloaded at run time): nothing to compare with.
    hub = ["preset=llama3-8b-8xh100", "model.config_file=null", "batch.max_seq_length=100000"]
    assert config.dubious_values(load_config(hub)) == []


def test_a_mapping_takes_new_entries_and_the_rest_keep_their_types():
    """model.config_overrides holds the model's own keys: +key adds one, ~key removes one; numbers
    given to a number key become its type (1 -> 1.0), and a number given to a string key a string."""
    cfg = load_config(
        ["preset=tiny", "+model.config_overrides.rope_theta=1000", "~model.config_overrides.head_dim"]
    )
    assert cfg.model.config_overrides.rope_theta == 1000 and "head_dim" not in cfg.model.config_overrides
    cfg = load_config(["preset=tiny", "optim.lr=1", "optim.betas.0=0.5", "data.path=2024", "name=7"])
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.data.path, cfg.run_dir) == (
        1.0,
        [0.5, 0.95],
        "2024",
        "runs/7",
    )
    assert (
        isinstance(cfg.optim.lr, float) and load_config(["eval.cache_dir='false'"]).eval.cache_dir == "false"
    )


def test_every_choice_key_is_a_string_key_of_the_schema():
    """CHOICES names only keys the schema has (a renamed key would go unchecked), each a string."""
    assert {key: declared_type(key) for key in CHOICES} == {
        key: str | None if None in allowed else str for key, allowed in CHOICES.items()
    }
