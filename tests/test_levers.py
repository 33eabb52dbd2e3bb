"""The speed levers: each changes what moves or when, never what is learned (except bf16 reductions,
whose cost in precision is measured), and precision=auto picks by what the hardware does natively.

Spawned gloo ranks, a tiny random Llama in fp32, two real training steps per setting; the second
runs under fsdp/comm.py's tracker, so bytes and the order of collectives are the real ones.
"""

from __future__ import annotations

import pytest

from fsdp.metrics import read_metrics
from tests.helpers import losses, ragged_examples, run, run_distributed, tiny_config

VOCAB = 250


def two_steps(d, tie: bool = True, **levers) -> dict:
    """Losses of two steps (2 micro-batches each), the second's collectives, and the unit names."""
    from batch import BatchGeometry
    from data.loader import DistributedBatchLoader
    from fsdp.adamw import AdamW, param_groups
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.comm import CommTracker
    from fsdp.layout import describe_units
    from fsdp.step import train_step

    model = build_sharded_model(
        tiny_config(vocab_size=VOCAB, tie=tie), d, BuildSettings(precision="fp32", **levers), seed=3
    )
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-3)
    loader = DistributedBatchLoader(
        ragged_examples(32, vocab_size=VOCAB), BatchGeometry(2, 2, d.world_size, 64), d.rank, 0, 0
    )
    first = train_step(model, optimizer, loader.next_step(), 1.0)
    with CommTracker(model, d.world_size) as comm:
        second = train_step(model, optimizer, loader.next_step(), 1.0)
    units = describe_units(model, d.world_size, "fp32")
    return {
        "losses": [first.loss, second.loss],
        "totals": comm.ledger.totals(),
        "events": [(e.kind, e.unit, e.phase) for e in comm.ledger.events],
        "units": [(u.name, u.reshard_after_forward, u.padded_numel) for u in units],
    }


def gradients(d, reduce_dtype: str | None) -> dict:
    """The whole gradient of every parameter after one global batch, reduced in `reduce_dtype`."""
    from batch import BatchGeometry
    from data.loader import DistributedBatchLoader
    from fsdp.build import BuildSettings, build_sharded_model

    model = build_sharded_model(
        tiny_config(vocab_size=VOCAB), d, BuildSettings(precision="fp32", reduce_dtype=reduce_dtype), seed=3
    )
    loader = DistributedBatchLoader(
        ragged_examples(32, vocab_size=VOCAB), BatchGeometry(4, 1, d.world_size, 64), d.rank, 0, 0
    )
    (batch,) = loader.next_step()
    (model(batch.input_ids, batch.position_ids, batch.labels) / batch.step_totals[0]).backward()
    return {n: p.grad.full_tensor() for n, p in model.named_parameters()}


def scenarios(d) -> dict:
    out = {
        name: two_steps(d, tie, **levers)
        for name, tie, levers in (
            ("tied", True, {}),
            ("tied split", True, {"split_root": True}),
            ("untied", False, {}),
            ("untied split", False, {"split_root": True}),
            ("prefetch", True, {"explicit_prefetch": 1}),
            ("untied split prefetch", False, {"split_root": True, "explicit_prefetch": 1}),
            ("bf16 reduce", True, {"reduce_dtype": "bf16"}),
            ("offload", True, {"activation_offload": True}),
            ("full", True, {"checkpointing": "full"}),
            ("full offload", True, {"checkpointing": "full", "activation_offload": True}),
        )
    }
    out["grads fp32"], out["grads bf16"] = gradients(d, None), gradients(d, "bf16")
    return out


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return run_distributed(scenarios, 2)[0]


def _gathered(result: dict, phase: str) -> list[str]:
    return [unit for kind, unit, p in result["events"] if kind == "all-gather" and p == phase]


def test_split_root_gathers_the_root_once_per_micro_batch_and_learns_the_same(two_ranks):
    r = two_ranks
    # Tied: one unit holds the shared weight; kept from its forward to its backward, it is not
    # gathered again: 2 micro-batches x the root's bytes fewer, the layers unchanged.
    (root, reshards, root_numel) = r["tied"]["units"][0]
    assert (root, reshards) == ("root", True)
    assert r["tied split"]["units"][0] == ("root", False, root_numel)
    saved = (
        r["tied"]["totals"]["all-gather"]["payload_bytes"]
        - r["tied split"]["totals"]["all-gather"]["payload_bytes"]
    )
    assert saved == 2 * root_numel * 4
    assert _gathered(r["tied split"], "backward").count("root") == 0
    assert _gathered(r["tied"], "backward").count("root") == 2
    # Untied: torchtitan's units, the embeddings alone and the final norm with the head, kept gathered.
    names = [u[0] for u in r["untied split"]["units"]]
    assert names == [
        "causal_lm.model.embed_tokens",
        "causal_lm.model.layers.0",
        "causal_lm.model.layers.1",
        "causal_lm.model.norm+causal_lm.lm_head",
    ]
    assert r["untied split"]["units"][0][1] is True and r["untied split"]["units"][-1][1] is False
    head_numel = r["untied split"]["units"][-1][2]
    saved = (
        r["untied"]["totals"]["all-gather"]["payload_bytes"]
        - r["untied split"]["totals"]["all-gather"]["payload_bytes"]
    )
    assert saved == 2 * head_numel * 4  # the head (and norm) no longer gathered in backward
    assert _gathered(r["untied split"], "backward").count("causal_lm.model.norm+causal_lm.lm_head") == 0
    # The same arithmetic: the losses are bitwise those of one root unit.
    assert r["tied split"]["losses"] == r["tied"]["losses"]
    assert r["untied split"]["losses"] == r["untied"]["losses"]


def test_explicit_prefetch_issues_the_next_all_gather_before_the_unit_computes(two_ranks):
    def order(result: dict) -> list[tuple[str, str]]:
        return [(k, u) for k, u, p in result["events"] if p == "forward" and k in ("all-gather", "compute")][
            :5
        ]

    layer0, layer1 = "causal_lm.model.layers.0", "causal_lm.model.layers.1"
    implicit = order(two_ranks["tied"])
    explicit = order(two_ranks["prefetch"])
    assert implicit.index(("all-gather", layer1)) > implicit.index(("compute", layer0))
    assert explicit.index(("all-gather", layer1)) < explicit.index(("compute", layer0))
    # Same bytes, same calls, same losses: only the moment changes.
    assert two_ranks["prefetch"]["totals"] == two_ranks["tied"]["totals"]
    assert two_ranks["prefetch"]["losses"] == two_ranks["tied"]["losses"]
    # With the split root, the embeddings prefetch the first layer and the last layer the head.
    split = order(two_ranks["untied split prefetch"])
    assert split[:2] == [("all-gather", "causal_lm.model.embed_tokens"), ("all-gather", layer0)]
    assert two_ranks["untied split prefetch"]["losses"] == two_ranks["untied split"]["losses"]


def test_bf16_reductions_halve_the_bytes_at_a_measured_cost_in_precision(two_ranks):
    import torch

    fp32, bf16 = two_ranks["tied"]["totals"], two_ranks["bf16 reduce"]["totals"]
    assert bf16["reduce-scatter"]["payload_bytes"] * 2 == fp32["reduce-scatter"]["payload_bytes"]
    assert bf16["all-gather"] == fp32["all-gather"]
    exact, rounded = two_ranks["grads fp32"], two_ranks["grads bf16"]
    difference = torch.sqrt(sum(((rounded[n] - exact[n]) ** 2).sum() for n in exact))
    norm = torch.sqrt(sum((exact[n] ** 2).sum() for n in exact))
    # bf16 keeps 8 bits of mantissa: each summand is rounded by up to 2^-9 of itself.
    assert 1e-5 < float(difference / norm) < 2**-8
    assert abs(two_ranks["bf16 reduce"]["losses"][1] - two_ranks["tied"]["losses"][1]) < 1e-3


def test_activation_offload_learns_exactly_the_same(two_ranks):
    """activation_checkpointing.offload moves what the layers save to host memory and back: the
    backward computes on the same values, so the losses are bitwise those without it, with every
    layer's activations offloaded (mode none) and with their inputs only (full, the recommended
    pairing); and no collective changes."""
    assert two_ranks["offload"]["losses"] == two_ranks["tied"]["losses"]
    assert two_ranks["full offload"]["losses"] == two_ranks["full"]["losses"]
    assert two_ranks["offload"]["totals"] == two_ranks["tied"]["totals"]
    assert two_ranks["full offload"]["events"] == two_ranks["full"]["events"]


@pytest.mark.fast
def test_auto_precision_is_mixed_where_bf16_is_native_and_fp32_elsewhere(monkeypatch):
    from fsdp import precision

    native = precision.CPU("Some Xeon", "AVX512", True, ("amx_bf16", "avx512_bf16"))
    emulated = precision.CPU("Some EPYC", "AVX2", False, ())
    monkeypatch.setattr(precision, "this_cpu", lambda: native)
    name, reason = precision.choose_precision("auto", "cpu")
    assert name == "mixed" and "amx_bf16" in reason
    monkeypatch.setattr(precision, "this_cpu", lambda: emulated)
    name, reason = precision.choose_precision("auto", "cpu")
    assert name == "fp32" and "AVX2" in reason and "emulated" in reason
    assert precision.choose_precision("mixed", "cpu")[0] == "mixed"  # asked for: always wins
    assert precision.choose_precision("bf16", "cpu")[0] == "bf16"
    assert precision.choose_precision("auto", "cuda")[0] == "mixed"  # a GPU to come (estimate.py)
    assert precision.get_precision("mixed", "bf16").reduce_bytes == 2
    assert precision.get_precision("mixed").reduce_bytes == 4


def test_default_run_says_which_precision_auto_chose_and_compiled_layers_learn_the_same(tmp_path):
    from fsdp.precision import choose_precision

    common = [
        "preset=tiny",
        "train.max_steps=2",
        "eval.sets=[]",
        "eval.max_new_tokens=0",
        "export.enabled=false",
        "checkpoint.at_end=false",
    ]
    eager = run([*common, f"run_dir={tmp_path / 'eager'}"], nproc=2)
    assert eager.returncode == 0, eager.stderr[-3000:]
    name, reason = choose_precision("auto", "cpu")
    assert f"precision  {reason}" in eager.stdout
    compiled = run(
        [*common, f"run_dir={tmp_path / 'compiled'}", f"precision={name}", "compile=true"], nproc=2
    )
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "compile on" in compiled.stdout and "compile off" in eager.stdout
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-4)

    rows = read_metrics(tmp_path / "compiled" / "metrics.jsonl")
    first = next(r for r in rows if "train/loss" in r)
    assert 0 < first["time/compile_s"] < first["time/step_s"]  # the one-time cost, reported
    assert "went to torch.compile" in compiled.stdout
