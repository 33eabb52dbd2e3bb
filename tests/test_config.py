"""Bad configuration is refused up front: one line naming the key, before any process group or file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from config import ConfigError, grad_accum_steps, load_config, validate
from tests.helpers import REPO


def refusal(argv: list[str], world_size: int = 1) -> str:
    """The message a bad config is refused with, by the checks train.py runs before anything else."""
    with pytest.raises(ConfigError) as refused:
        validate(load_config(argv), world_size)
    return f"config error: {refused.value}"


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
        (["data.prompts=hello"], "data.prompts=hello: must be a list of non-empty strings"),
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


@pytest.mark.parametrize("program", ["memory.estimate=true", "explain=true"])
def test_the_old_program_switches_point_at_their_programs(program):
    err = refusal([program])
    assert "is a program of its own now: python " in err


def test_geometry_uses_the_world_size(tmp_path):
    err = refusal([f"run_dir={tmp_path}/r", "batch.global_batch_size=12"], world_size=4)
    assert "micro_batch_size 2 x world size 4 = 8 sequences" in err
    cfg = load_config([f"run_dir={tmp_path}/r", "batch.global_batch_size=32"])
    validate(cfg, 4)
    assert grad_accum_steps(cfg, 4) == 4


def test_run_dir_with_a_run_is_refused_and_kept(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("precious\n")
    err = refusal([f"run_dir={run_dir}"])
    assert f"run_dir={run_dir}: already holds a run; pass resume=auto to continue it, overwrite=true" in err
    assert (run_dir / "metrics.jsonl").read_text() == "precious\n"
    validate(load_config([f"run_dir={run_dir}", "overwrite=true"]), 1)  # accepted when asked


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
