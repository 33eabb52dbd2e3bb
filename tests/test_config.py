"""Bad configuration is refused up front: one line naming the key, before any process group or file."""

from __future__ import annotations

import ast
import dataclasses
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import config.compose
from config import CONF_DIR, ConfigError, grad_accum_steps, load_config, validate
from config.schema import SCHEMA_NAME, RunConfig, declared_type, field_types
from tests.helpers import REPO


def refusal(argv: list[str], world_size: int = 1) -> str:
    """The message a bad config is refused with, by the checks train.py runs before anything else."""
    with pytest.raises(ConfigError) as refused:
        validate(load_config(argv), world_size)
    return f"config error: {refused.value}"


@pytest.mark.fast
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["preset=nope"], "preset=nope: unknown preset; choose one of: cpu-demo, llama3-8b-8xh100"),
        (["model=gpt5"], "model=gpt5: unknown model"),
        (
            ["model.name_or_path=/no/such/model"],
            "model.name_or_path=/no/such/model: no Hugging Face model folder",
        ),
        (["optim.lr=0"], "optim.lr=0: must be > 0"),
        (["optim.lr=-1e-5"], "optim.lr=-1e-05: must be > 0"),
        (["precision=fp16"], "precision=fp16: must be one of auto, mixed, bf16, fp32"),
        (["fsdp.reduce_dtype=fp16"], "fsdp.reduce_dtype=fp16: must be one of null, bf16, fp32"),
        (["fsdp.explicit_prefetch=-1"], "fsdp.explicit_prefetch=-1: must be a whole number of units >= 0"),
        (["fsdp.split_root=maybe"], "fsdp.split_root=maybe: must be true or false"),
        (["compile=1"], "compile=1: must be true or false"),
        (["optim.impl=apex"], "optim.impl=apex: must be one of loop, foreach, fused"),
        (["optim.state_dtype=fp16"], "optim.state_dtype=fp16: must be one of null, bf16, fp32"),
        (
            ["optim.state_dtype=bf16", "optim.impl=fused"],
            "optim.state_dtype=bf16: optim.impl=fused runs torch's fused kernel, which needs m and v in "
            "the parameters' dtype (fp32)",
        ),
        (
            ["optim.state_dtype=fp32", "precision=bf16"],
            "optim.state_dtype=fp32: wider than the bf16 parameters",
        ),
        (
            ["optim.state_dtype=bf16", "optim.betas=[0.9,0.999]"],
            "optim.state_dtype=bf16: optim.betas=[0.9, 0.999] move m or v by less than 0.0039 of the way",
        ),
        (
            ["activation_checkpointing.mode=some"],
            "activation_checkpointing.mode=some: must be one of none, selective, every_k, full",
        ),
        (["data=jsonl"], "data.path: required and not set"),
        (["data.path=missing.jsonl"], "data.path=missing.jsonl: no such file"),
        (
            ["batch.global_batch_size=10", "batch.micro_batch_size=4"],
            "batch.global_batch_size=10 does not divide into micro_batch_size 4",
        ),
        (["no_such_key=1"], "no_such_key"),
        (["optim.lr"], "'optim.lr': overrides are key=value"),
        (["data.general.fraction=1.5"], "data.general.fraction=1.5: must be in [0, 1)"),
        (["data=sample", "data.general.fraction=0.2"], "data.general.path=None: no such file"),
        (["data.format=xml"], "data.format=xml: must be one of prompt_response, chat, text"),
        (["data.too_long=keep"], "data.too_long=keep: must be one of truncate, drop"),
        (["data.eval_fraction=1"], "data.eval_fraction=1: must be in [0, 1)"),
        (["data.eval_path=nope.jsonl"], "data.eval_path=nope.jsonl: no such file"),
        (["data.path=data/samples/missing.jsonl"], "data.path=data/samples/missing.jsonl: no such file"),
        (["data.general.eval_path=gone.jsonl"], "data.general.eval_path=gone.jsonl: no such file"),
        (
            ["data=sample", "eval.sets=[domain,general]"],
            "eval.sets: 'general' is named, but the data has no general held-out set "
            "(set data.general.eval_path=FILE)",
        ),
        (
            ["data=sample", "data.eval_fraction=0", "eval.sets=[domain]"],
            "'domain' is named, but the data has no domain",
        ),
        (["eval.sets=[domain,wiki]"], "eval.sets: unknown set 'wiki'; the sets are domain, general, unseen"),
        (
            ["data=sample", "eval.sets=[unseen]"],
            "'unseen' is named, but the data has no unseen held-out set (set data.unseen.eval_path=FILE)",
        ),
        (["data.unseen.eval_path=nowhere.jsonl"], "data.unseen.eval_path=nowhere.jsonl: no such file"),
        (["data.general.format=xml"], "data.general.format=xml: must be one of text, prompt_response, chat"),
        (["eval.own_answers.prompts=q.txt"], "eval.own_answers.prompts=q.txt: no such file"),
        (
            ["eval.own_answers.prompts=requirements.txt", "eval.own_answers.max_new_tokens=0"],
            "max_new_tokens=0: must be",
        ),
        (["eval.every_steps=0"], "eval.every_steps=0: must be a whole number > 0, or null"),
        (["eval.max_examples=-5"], "eval.max_examples=-5: must be a whole number > 0, or null"),
        (["eval.max_new_tokens=-1"], "eval.max_new_tokens=-1: must be a whole number >= 0"),
        (["data.max_train_examples=0"], "data.max_train_examples=0: must be a whole number > 0, or null"),
        (["data.prompts=hello"], "data.prompts=hello: must be a list of strings"),
        (["data.prompts=['  ']"], "data.prompts=['  ']: must be a list of non-empty strings"),
        (["device=cpu", "backend=nccl"], "backend=nccl: NCCL runs on GPUs only, and device=cpu is the CPU"),
        (["fsdp.replicate=0"], "fsdp.replicate=0: must be auto or a whole number of replicas >= 1"),
        (["fsdp.replicate=3"], "fsdp.replicate=3: 3 replicas do not divide the 1 ranks"),
        (["comm.init_timeout_s=0"], "comm.init_timeout_s=0: must be > 0"),
        (["device=cpu", "fsdp.cpu_offload=true"], "fsdp.cpu_offload=true: only meaningful with device=cuda"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(argv, expected, tmp_path):
    err = refusal([f"run_dir={tmp_path / 'run'}", *argv])
    assert err.count("\n") == 0
    assert expected in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_train_py_refuses_a_bad_config_before_the_process_group(tmp_path):
    """As users run it: exit 2, one line on stderr naming the key, nothing written, no rank started.
    A negative clip norm would train: its clip coefficient flips every gradient (gradient ascent)."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "preset=tiny", f"run_dir={run_dir}", "optim.max_grad_norm=-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "config error: optim.max_grad_norm=-1: must be >= 0 (0 or null: no clipping)\n"
    assert result.stdout == "" and not run_dir.exists()


@pytest.mark.fast
@pytest.mark.parametrize("program", ["memory.estimate=true", "explain=true"])
def test_the_old_program_switches_point_at_their_programs(program):
    err = refusal([program])
    assert "is a program of its own now: python " in err


@pytest.mark.fast
def test_geometry_uses_the_world_size(tmp_path):
    err = refusal([f"run_dir={tmp_path}/r", "batch.global_batch_size=12"], world_size=4)
    assert "micro_batch_size 2 x world size 4 = 8 sequences" in err
    cfg = load_config([f"run_dir={tmp_path}/r", "batch.global_batch_size=32"])
    validate(cfg, 4)
    assert grad_accum_steps(cfg, 4) == 4


@pytest.mark.fast
def test_run_dir_with_a_run_is_refused_and_kept(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("precious\n")
    err = refusal([f"run_dir={run_dir}"])
    assert f"run_dir={run_dir}: already holds a run; pass resume=auto to continue it, overwrite=true" in err
    assert (run_dir / "metrics.jsonl").read_text() == "precious\n"
    validate(load_config([f"run_dir={run_dir}", "overwrite=true"]), 1)  # accepted when asked


@pytest.mark.fast
def test_presets_compose_and_validate(tmp_path):
    demo = load_config([])
    assert demo.name == "cpu-demo" and demo.model.name_or_path.endswith("SmolLM2-135M-Instruct")
    # The default job: the medical task with 20% general text, packed.
    assert demo.data.path.endswith("medical-terms/train.jsonl") and demo.data.general.fraction == 0.2
    assert demo.data.packing and demo.data.eval_path.endswith("medical-terms/eval.jsonl")
    assert load_config(["data=sample"]).data.path == "data/samples/unit-conversions.jsonl"
    tiny = load_config(["preset=tiny"])
    assert tiny.model.random_init and tiny.model.config_overrides.num_hidden_layers == 2
    recipe = load_config(["preset=llama3-8b-8xh100"])
    assert recipe.model.name_or_path == "meta-llama/Meta-Llama-3-8B"
    assert (recipe.batch.micro_batch_size, recipe.batch.grad_accum_steps, recipe.optim.lr) == (2, 16, 2e-5)
    assert recipe.batch.max_seq_length == 2048 and recipe.train.epochs == 3
    # Command-line choices win over the preset's.
    assert load_config(["preset=tiny", "model=smollm2-135m"]).model.random_init is False
    # Hub names are accepted without a local folder (downloaded at run time).
    validate(load_config([f"run_dir={tmp_path}/r", "preset=llama3-8b-8xh100", "data=sample"]), 8)


@pytest.mark.fast
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals of a machine without a GPU")
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["device=cuda"], "device=cuda: no CUDA device is visible on"),
        (["backend=nccl"], "backend=nccl: NCCL runs on GPUs only, and device=auto is the CPU here"),
    ],
)
def test_a_gpu_setting_without_a_gpu_is_refused(argv, expected, tmp_path):
    assert expected in refusal([f"run_dir={tmp_path / 'run'}", *argv])


@pytest.mark.fast
def test_backends_and_devices_fit_each_other(monkeypatch):
    from fsdp.dist import device_index, process_group_backend, replicate_degree

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert process_group_backend(cpu) == "gloo" and process_group_backend(gpu) == "nccl"
    assert process_group_backend(gpu, "auto", cpu_offload=True) == "cuda:nccl,cpu:gloo"
    # A launcher that shows each process its own GPU leaves LOCAL_RANK as is: 3 of one visible is 0.
    assert [device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    assert [device_index(r, 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert replicate_degree("auto", 16, 8) == 2 and replicate_degree("auto", 8, 8) == 1
    assert replicate_degree(4, 16, 8) == 4
    # device=cuda with backend=gloo is refused whether or not this machine has a GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(["device=cuda", "backend=gloo"])
    with pytest.raises(ConfigError, match="backend=gloo: FSDP on GPUs needs NCCL"):
        validate(cfg, 1)


def ranks_compare_configs(d, timeout_s: float) -> dict:
    """Rank 1 composed another learning rate; then rank 1 skips a collective rank 0 waits in."""
    import time

    import torch.distributed as dist

    from config import check_same_config
    from fsdp.dist import from_every_rank, set_timeout

    same = load_config(["preset=tiny"])
    check_same_config(same, from_every_rank)  # equal: returns quietly
    other = load_config(["preset=tiny", *(["optim.lr=3e-4"] if d.rank == 1 else [])])
    try:
        check_same_config(other, from_every_rank)
        refused = None
    except ConfigError as err:
        refused = str(err)
    set_timeout(timeout_s)
    start, waited = time.monotonic(), None
    if d.rank == 0:
        try:
            dist.all_reduce(torch.ones(1))  # rank 1 never joins
        except RuntimeError:
            waited = time.monotonic() - start
    else:
        time.sleep(timeout_s + 1)
    dist.destroy_process_group()  # no barrier: the group is out of step now
    return {"refused": refused, "waited": waited}


def test_ranks_agree_on_the_config_and_a_lone_collective_times_out():
    from tests.helpers import run_distributed

    ranks = run_distributed(ranks_compare_configs, 2, 3.0)
    for rank in ranks:
        assert rank["refused"] == (
            "optim.lr: rank 0 has 0.001, rank 1 has 0.0003; every node must compose the same config "
            "(the same checkout and the same overrides)"
        )
    assert 3.0 <= ranks[0]["waited"] < 30  # the training timeout, not the 30 minutes of set-up


def leaves(tree: object, prefix: str = "") -> typing.Iterator[tuple[str, object]]:
    """(dotted key, value) of every leaf of a yaml file; a mapping field's entries are its value."""
    if isinstance(tree, dict) and typing.get_origin(declared_type(prefix)) is not dict:
        for key, value in tree.items():
            if key != "defaults":
                yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, tree


def conf_files() -> list[tuple[Path, str]]:
    """Every yaml file of conf/, with the key its content lands under (presets: the root)."""
    files = [(CONF_DIR / "config.yaml", "")]
    for group, package in (("preset", ""), ("model", "model"), ("data", "data")):
        files += [(path, package) for path in sorted((CONF_DIR / group).glob("*.yaml"))]
    return files


@pytest.mark.fast
def test_the_schema_and_config_yaml_have_the_same_keys():
    """conf/config.yaml gives every key of the schema its value and has no other key, but for the
    model's, which every file of the model group sets."""
    in_yaml = dict(leaves(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))))
    model_keys = {key for key in field_types() if key.startswith("model.")}
    assert sorted(set(in_yaml) ^ (set(field_types()) - model_keys)) == []
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        assert dict(leaves(OmegaConf.to_container(OmegaConf.load(path)), "model")).keys() == model_keys
    assert OmegaConf.load(CONF_DIR / "config.yaml").defaults[0] == SCHEMA_NAME  # the base, first


def has_type(value: object, annotation: object) -> bool:
    """The value is one of the declared type, without any of OmegaConf's conversions."""
    if isinstance(annotation, types.UnionType):
        return any(has_type(value, arg) for arg in typing.get_args(annotation))
    if annotation is typing.Any or (isinstance(value, str) and value.startswith("${")):
        return True
    if value == "???":
        return True  # required: set by a group file or on the command line
    if typing.get_origin(annotation) in (list, dict):
        (item,) = typing.get_args(annotation)[-1:]
        container = typing.get_origin(annotation)
        items = value.values() if isinstance(value, dict) else value
        return isinstance(value, container) and all(has_type(v, item) for v in items)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


@pytest.mark.fast
def test_every_value_in_conf_has_its_key_s_type():
    """Each file's keys are the schema's, and each value is already of its type: OmegaConf would
    turn `packing: 1` into true and `path: 2024` into "2024" without a word."""
    wrong = []
    for path, package in conf_files():
        for key, value in leaves(OmegaConf.to_container(OmegaConf.load(path)), package):
            annotation = declared_type(key)
            if annotation is None or not has_type(value, annotation):
                wrong.append(f"{path.relative_to(CONF_DIR)}: {key}={value!r} ({annotation})")
    assert wrong == []


@pytest.mark.fast
def test_every_field_of_the_schema_has_a_docstring():
    """Each field says what it means right under it (torchtitan's job config does the same)."""
    tree = ast.parse(Path(REPO, "config", "schema.py").read_text())
    undocumented, fields = [], 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for statement, after in zip(node.body, [*node.body[1:], None], strict=True):
                if isinstance(statement, ast.AnnAssign):
                    fields += 1
                    documented = (
                        isinstance(after, ast.Expr)
                        and isinstance(after.value, ast.Constant)
                        and isinstance(after.value.value, str)
                        and after.value.value.strip()
                    )
                    if not documented:
                        undocumented.append(f"{node.name}.{statement.target.id}")
    assert undocumented == [] and fields == sum(1 for _ in dataclass_fields(RunConfig))


def dataclass_fields(schema: type) -> typing.Iterator[str]:
    for entry in dataclasses.fields(schema):
        yield entry.name
        if dataclasses.is_dataclass(entry.type):
            yield from dataclass_fields(entry.type)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("group_file", "text", "expected"),
    [
        (
            "preset/bad.yaml",
            "# @package _global_\noptim:\n  lr: abc\n",
            "optim.lr=abc: must be a number (in conf/preset/bad.yaml)",
        ),
        (
            "preset/bad.yaml",
            "# @package _global_\noptim:\n  learning_rate: 1.0e-5\n",
            "optim.learning_rate: no such key (in conf/preset/bad.yaml; config/schema.py has them all)",
        ),
        (
            "model/bad.yaml",
            "name_or_path: x\nrandom_init: true\nlayers: 2\n",
            "model.layers: no such key (in conf/model/bad.yaml;",
        ),
        (
            "data/bad.yaml",
            "format: text\npath: x.txt\npacking: [1]\n",
            "data.packing=[1]: must be true or false",
        ),
    ],
)
def test_a_bad_group_or_preset_file_is_one_line_naming_key_and_file(
    group_file, text, expected, tmp_path, monkeypatch
):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / group_file).write_text(text)
    monkeypatch.setattr(config.compose, "CONF_DIR", conf)
    group = group_file.partition("/")[0]
    with pytest.raises(ConfigError) as refused:
        load_config([f"{group}=bad"])
    assert str(refused.value).startswith(expected) and "\n" not in str(refused.value)
