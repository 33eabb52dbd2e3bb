"""Memory: the analytic model, the measured ledger and the fake-tensor estimate, number against number.

Every measurement here is FSDPMemTracker's (through fsdp.memory.MemoryLedger) around one real
steady-state training step (fsdp/memory/measure.py): AdamW's state exists before the step, as it
does from step 2 on, and batches are full-length.
"""

from __future__ import annotations

import pytest

from fsdp.memory import CATEGORIES, ModelShape, Workload, fits, predict, sharded_numel
from fsdp.precision import PRECISIONS
from tests.helpers import DEFAULT_MODEL, run_distributed, tiny_config

TINY_VOCAB = 250  # 250 embedding rows: FSDP pads them to 252 at 4 ranks


def _tiny():
    return tiny_config("llama", vocab_size=TINY_VOCAB, layers=2)


def _smollm():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(DEFAULT_MODEL)


def _measure_all(d, jobs: list[tuple[str, Workload]]) -> list[dict]:
    from fsdp.memory.measure import measure_step

    configs = {"tiny": _tiny, "smollm": _smollm}
    return [measure_step(configs[name](), d, w) for name, w in jobs]


# --- model state: 16 (mixed), 8 (bf16), 16 (fp32) bytes per parameter, over N ranks ----------


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_model_state_is_exactly_bytes_per_param_over_world_size(world_size):
    precisions = ("mixed", "bf16", "fp32")
    jobs = [
        ("tiny", Workload(world_size, p, micro_batch_size=1, seq_len=32, chunk_tokens=16, device="cpu"))
        for p in precisions
    ]
    ledgers = run_distributed(_measure_all, world_size, jobs)[0]  # rank 0: its shards are the padded size

    shape = ModelShape.from_hf_config(_tiny())
    shapes = [s for _, s in shape.param_shapes]
    per_rank = sharded_numel(shapes, world_size)
    padding = predict(shape, jobs[0][1])["padding elements"]
    assert per_rank * world_size == shape.num_params + padding
    assert (padding > 0) == (world_size == 4)  # 250 rows split 4 ways: 63 each, 2 rows of padding
    for precision, ledger in zip(precisions, ledgers, strict=True):
        measured = ledger["categories"]
        step_counters = 4 * len(shapes)  # AdamW's per-parameter step, a 4-byte scalar
        model_state = (
            measured["sharded params"]
            + measured["sharded grads"]
            + measured["optimizer state"]
            - step_counters
        )
        bytes_per_param = sum(PRECISIONS[precision].bytes_per_param.values())
        assert model_state == bytes_per_param * per_rank, precision
        assert bytes_per_param == {"mixed": 16, "bf16": 8, "fp32": 16}[precision]


# --- the analytic model against the measured ledger ---------------------------------------------

# The precisions that compute in bf16 on the tiny model; SmolLM2's real shapes in fp32, which every
# CPU computes at full speed (bf16 matmuls are emulated, ~50x slower, on AVX2-only CPUs).
ANALYTIC_JOBS = [
    (name, Workload(2, precision, ac, micro_batch_size=mb, seq_len=seq, chunk_tokens=chunk, device="cpu"))
    for name, mb, seq, chunk, precisions in (
        ("tiny", 2, 128, 64, ("mixed", "bf16")),
        ("smollm", 1, 256, 128, ("fp32",)),
    )
    for precision in precisions
    for ac in ("none", "full")
]


@pytest.fixture(scope="module")
def measured_ledgers() -> list[dict]:
    return run_distributed(_measure_all, 2, ANALYTIC_JOBS)[0]


def _shape(name: str) -> ModelShape:
    return ModelShape.from_hf_config(_tiny() if name == "tiny" else _smollm())


@pytest.mark.parametrize(
    "index", range(len(ANALYTIC_JOBS)), ids=[f"{n}-{w.precision}-{w.checkpointing}" for n, w in ANALYTIC_JOBS]
)
def test_analytic_model_within_10_percent_of_every_category_above_1_percent(measured_ledgers, index):
    name, w = ANALYTIC_JOBS[index]
    measured = measured_ledgers[index]
    predicted = predict(_shape(name), w)
    checked = 0
    for category in CATEGORIES:
        m, a = measured["categories"][category], predicted["categories"][category]
        if m > 0.01 * measured["peak"]:
            assert abs(a - m) <= 0.10 * m, f"{category}: analytic {a:,} measured {m:,}"
            checked += 1
    assert checked >= 8  # model state, gathered state, activations, logits, buffers, temporaries
    # The peak, a sum of what is alive together, is looser but still close.
    assert abs(predicted["peak"] - measured["peak"]) <= 0.15 * measured["peak"]


@pytest.mark.parametrize(("name", "precision"), [("tiny", "mixed"), ("tiny", "bf16"), ("smollm", "fp32")])
def test_checkpointing_cuts_activations_by_the_predicted_factor(measured_ledgers, name, precision):
    def find(ac):
        i = next(
            i
            for i, (n, w) in enumerate(ANALYTIC_JOBS)
            if n == name and w.precision == precision and w.checkpointing == ac
        )
        return measured_ledgers[i]["categories"]["activations"], predict(_shape(name), ANALYTIC_JOBS[i][1])

    measured_none, predicted_none = find("none")
    measured_full, predicted_full = find("full")
    measured_factor = measured_none / measured_full
    predicted_factor = (
        predicted_none["categories"]["activations"] / predicted_full["categories"]["activations"]
    )
    assert measured_factor > 3  # checkpointing matters: 4x (tiny), 16x (SmolLM2, 30 layers)
    assert abs(predicted_factor - measured_factor) <= 0.15 * measured_factor


def test_adamw_step_adds_one_parameter_shard_at_most(measured_ledgers):
    for (name, w), ledger in zip(ANALYTIC_JOBS, measured_ledgers, strict=True):
        shapes = [s for _, s in _shape(name).param_shapes]
        largest_shard = max(sharded_numel([s], w.world_size) for s in shapes)
        step = ledger["phases"]["optimizer step"]
        assert 0 < step["temporaries"] <= PRECISIONS[w.precision].storage_bytes * largest_shard


def test_optimizer_temporaries_by_impl_measured_and_predicted():
    """The memory price of speed (optim.impl): foreach holds a whole group's denominators, the loop one, fused none."""
    impls = ("loop", "foreach", "fused")
    jobs = [
        (
            "tiny",
            Workload(
                2, "fp32", micro_batch_size=1, seq_len=32, chunk_tokens=16, device="cpu", optim_impl=impl
            ),
        )
        for impl in impls
    ]
    ledgers = run_distributed(_measure_all, 2, jobs)[0]
    steps = {impl: ledger["phases"]["optimizer step"] for impl, ledger in zip(impls, ledgers, strict=True)}
    measured = {impl: step["temporaries"] for impl, step in steps.items()}
    shape = _shape("tiny")
    for impl, (_, w) in zip(impls, jobs, strict=True):
        predicted = predict(shape, w)["temporaries"]["optimizer step"]
        assert abs(predicted - measured[impl]) <= 0.10 * measured[impl], (
            f"{impl}: {predicted:,} {measured[impl]:,}"
        )
    shapes = [s for _, s in shape.param_shapes]
    matrices_but_embedding = [s for s in shapes if len(s) == 2 and s[0] != TINY_VOCAB]  # tied: no head
    assert measured["loop"] == 4 * max(sharded_numel([s], 2) for s in shapes)  # the embedding's shard
    assert measured["foreach"] == 4 * sharded_numel(matrices_but_embedding, 2)  # the decay group's shards
    assert measured["foreach"] > measured["loop"] > measured["fused"] == 0
    # Nothing else in the step differs: its peak moves by the temporaries alone.
    assert len({step["total"] - step["temporaries"] for step in steps.values()}) == 1


# --- the fake-tensor estimate against the real ledger -----------------------------------------


def test_fake_tensor_ledger_equals_real_ledger():
    from fsdp.memory.measure import measure_step_on_fake_tensors

    jobs = [
        ("tiny", Workload(2, "mixed", "none", micro_batch_size=2, seq_len=64, chunk_tokens=32, device="cpu")),
        (
            "tiny",
            Workload(
                2,
                "mixed",
                "full",
                micro_batch_size=2,
                seq_len=64,
                chunk_tokens=32,
                grad_accum_steps=2,
                device="cpu",
            ),
        ),
    ]
    real = run_distributed(_measure_all, 2, jobs)[0]
    shape = _shape("tiny")
    largest_unit = max(sharded_numel(u, 2) * 2 for u in shape.unit_shapes())
    for (_, w), real_ledger in zip(jobs, real, strict=True):
        fake = measure_step_on_fake_tensors(_tiny(), w)
        for category in CATEGORIES:
            r, f = real_ledger["categories"][category], fake["categories"][category]
            if category == "reduce-scatter buffers":
                # ATen's CPU kernel for FSDP's copy-in upcasts a unit's gradients first; the fake
                # (and CUDA) kernels write into the flat buffer directly: exactly one unit apart.
                assert r - f == PRECISIONS[w.precision].reduce_bytes * largest_unit
            else:
                assert abs(r - f) <= 0.01 * max(r, 1), f"{category}: real {r:,} fake {f:,}"
        assert fake["categories"]["unsharded grads"] > (
            real_ledger["categories"]["sharded params"] if w.grad_accum_steps > 1 else 0
        )


def test_llama3_8b_at_8_ranks_on_fake_tensors():
    """The classic recipe's step (checkpointing off: half the fake run's time), measured on a laptop."""
    from transformers import AutoConfig

    from config import CONF_DIR
    from fsdp.memory.measure import measure_step_on_fake_tensors

    config = AutoConfig.from_pretrained(CONF_DIR / "model" / "llama3-8b.json")
    w = Workload(8, "mixed", "none", micro_batch_size=2, seq_len=2048, chunk_tokens=1024, grad_accum_steps=16)
    fake = measure_step_on_fake_tensors(config, w)
    shape = ModelShape.from_hf_config(config)
    assert shape.num_params == 8_030_261_248
    shapes = [s for _, s in shape.param_shapes]
    per_rank = sharded_numel(shapes, 8)
    measured = fake["categories"]
    assert measured["sharded params"] == 4 * per_rank
    assert measured["optimizer state"] == 8 * per_rank + 4 * len(shapes)
    # The issue measured torch.optim.AdamW(foreach=True) here at 13.6 GiB of optimizer state where m
    # and v take 7.5: its foreach temporaries cover every parameter at once. Ours: one shard at most.
    largest_shard = max(sharded_numel([s], 8) for s in shapes)  # the output head's 128256 x 4096 / 8
    assert fake["phases"]["optimizer step"]["temporaries"] <= 4 * largest_shard
    assert 4 * largest_shard / 2**30 < 0.25
    # Accumulating 16 micro-batches unreduced keeps every whole gradient in fp32: 30 GiB per rank.
    assert measured["unsharded grads"] >= 4 * shape.num_params
    predicted = predict(shape, w)
    for category in CATEGORIES:
        m, a = measured[category], predicted["categories"][category]
        if m > 0.01 * fake["peak"]:
            assert abs(a - m) <= 0.10 * m, category
    assert abs(predicted["peak"] - fake["peak"]) <= 0.05 * fake["peak"]


def test_estimate_command_prints_the_quick_math_and_what_fits(capsys):
    import estimate

    args = [
        "model=smollm2-135m",
        "memory.world_size=4",
        "memory.fit_gib=2",
        "batch.micro_batch_size=1",
        "batch.max_seq_length=256",
        "loss.chunk_tokens=128",
        "activation_checkpointing.mode=none",
        "batch.grad_accum_steps=1",
    ]
    assert estimate.main(args) == 0
    out = capsys.readouterr().out
    shape = _shape("smollm")
    w = Workload(4, "mixed", "none", every_k=2, micro_batch_size=1, seq_len=256, chunk_tokens=128)
    answer = fits(shape, w, 2 * 2**30)
    for mode, micro in answer.items():
        verdict = f"micro-batch up to {micro}" if micro else "no micro-batch fits"
        assert f"activation checkpointing {mode:<8} {verdict}" in out
    assert answer["full"] >= answer["none"] >= 1
    # The usual quick math's 12 bytes/param and this code's 16, for SmolLM2's 134.5M parameters.
    quick_total = next(line for line in out.splitlines() if "quick math: total, one GPU" in line)
    assert float(quick_total.split()[-1]) == pytest.approx(12 * shape.num_params / 1e9, abs=0.05)
    model_state = next(line for line in out.splitlines() if "model state (16 B/param)" in line)
    assert float(model_state.split()[-1]) == pytest.approx(16 * shape.num_params / 1e9 / 4, abs=0.05)
    sharded = next(line for line in out.splitlines() if line.strip().startswith("sharded params"))
    analytic, fake = (float(x) for x in sharded.split()[-2:])
    assert (
        analytic
        == fake
        == pytest.approx(4 * sharded_numel([s for _, s in shape.param_shapes], 4) / 2**30, abs=1e-3)
    )


def test_estimate_refuses_a_model_without_a_config_on_disk(capsys):
    import estimate

    code = estimate.main(["model=llama3-8b", "model.config_file=/nonexistent/config.json"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.config_file=/nonexistent/config.json" in err and "downloads nothing" in err
