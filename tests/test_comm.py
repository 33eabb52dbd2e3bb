"""Seeing sharding at work: shard layout, bytes on the wire against the theory, FLOPs per token.

The distributed parts run on spawned gloo ranks with a tiny random Llama whose vocabulary (250)
does not divide by 4, so FSDP pads; the collectives are counted by fsdp/comm.py during real steps.
"""

from __future__ import annotations

import pytest

from tests.helpers import ragged_examples, run_distributed, tiny_config

VOCAB = 250  # 250 rows over 4 ranks: 63, 63, 63, 61, padded to 4 x 63


def layouts(d) -> dict:
    """Each rank's real local shard shapes, beside what describe_units says of every rank."""
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.layout import describe_units

    model = build_sharded_model(tiny_config(vocab_size=VOCAB), d, BuildSettings(precision="mixed"))
    units = describe_units(model, d.world_size, "mixed")
    local = {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}
    return {"units": units, "local": local}


def comm_step(d, reshard_after_forward: bool, reduce_every: bool, checkpointing: str) -> dict:
    """Bytes of the second of two training steps (2 micro-batches), per kind and per unit."""
    from batch import BatchGeometry
    from data.loader import DistributedBatchLoader
    from fsdp.adamw import AdamW, param_groups
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.comm import CommTracker, format_totals, theory_for
    from fsdp.layout import describe_units
    from fsdp.step import train_step

    model = build_sharded_model(
        tiny_config(vocab_size=VOCAB),
        d,
        BuildSettings(
            precision="mixed", checkpointing=checkpointing, reshard_after_forward=reshard_after_forward
        ),
    )
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-3)
    loader = DistributedBatchLoader(
        ragged_examples(32, vocab_size=VOCAB), BatchGeometry(2, 2, d.world_size, 64), d.rank, 0, 0
    )
    train_step(model, optimizer, loader.next_step(), 1.0, reduce_every)
    with CommTracker(model, d.world_size) as comm:
        train_step(model, optimizer, loader.next_step(), 1.0, reduce_every)
    described = describe_units(model, d.shard_size, "mixed")
    units = {u.name: (u.padded_numel, u.reshard_after_forward) for u in described}
    theory = theory_for(
        described,
        d.world_size,
        2,
        precision="mixed",
        reduce_every_microbatch=reduce_every,
        replicate=d.replicas,
    )
    return {
        "totals": comm.ledger.totals(),
        "fsdp": comm.ledger.totals(units=True),
        "payload": dict(comm.ledger.payload),
        "sent": dict(comm.ledger.sent),
        "units": units,
        "table": format_totals(comm.ledger, theory),
    }


def hsdp_comm_step(d) -> dict:
    """comm_step on HSDP's 2 x 2 mesh: 2 replicas, each unit sharded over the 2 ranks of a replica."""
    from dataclasses import replace

    from fsdp.dist import make_mesh

    return comm_step(replace(d, mesh=make_mesh("cpu", d.world_size, 2)), True, False, "none")


def group_timeouts(d) -> dict:
    """Seconds each group of HSDP's 2 x 1 mesh (the replicate group; each rank's own shard group)
    and the default group wait in a collective: as init_distributed gives them, then after set_timeout."""
    import torch
    import torch.distributed as dist

    from fsdp.dist import init_distributed, set_timeout

    hsdp = init_distributed("cpu", "gloo", replicate=2, timeout_s=1234)  # the group exists: a new mesh
    groups = [hsdp.mesh.get_group(0), hsdp.mesh.get_group(1), dist.group.WORLD]

    def seconds() -> list[float]:
        return [g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups]

    given = seconds()
    set_timeout(56)
    return {"init": given, "set": seconds()}


def scenarios(d) -> dict:
    out = {"layouts": layouts(d)}
    for reshard, reduce_every, checkpointing in (
        (True, False, "none"),
        (True, False, "full"),
        (False, False, "none"),
        (True, True, "none"),
    ):
        out[(reshard, reduce_every, checkpointing)] = comm_step(d, reshard, reduce_every, checkpointing)
    out["timeouts"] = group_timeouts(d)  # last: it changes every group's timeout
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(scenarios, 2)


@pytest.mark.parametrize("world_size", [2, 4])
def test_shard_shapes_and_bytes_per_rank(request, world_size):
    results = request.getfixturevalue("two_ranks" if world_size == 2 else "four_ranks")
    results = [r["layouts"] for r in results]
    units = results[0]["units"]
    assert [u.name for u in units] == ["root", "causal_lm.model.layers.0", "causal_lm.model.layers.1"]
    embed = units[0].params[0]
    assert embed.name == "causal_lm.model.embed_tokens.weight" and embed.full_shape == (VOCAB, 64)
    rows = {2: [125, 125], 4: [63, 63, 63, 61]}[world_size]
    assert [s[0] for s in embed.rank_shapes] == rows
    assert embed.padding_rows == {2: 0, 4: 2}[world_size]
    per_rank_rows = -(-VOCAB // world_size)
    assert embed.storage_bytes == per_rank_rows * 64 * 4  # fp32 master shard, padded
    assert embed.gathered_bytes == per_rank_rows * world_size * 64 * 2  # bf16, whole, padded
    k_proj = next(p for p in units[1].params if p.name.endswith("k_proj.weight"))
    assert k_proj.full_shape == (32, 64) and k_proj.rank_shapes == [(32 // world_size, 64)] * world_size
    # Every rank's real shards are what describe_units says of that rank.
    for rank, result in enumerate(results):
        for unit in units:
            for p in unit.params:
                assert result["local"][p.name] == p.rank_shapes[rank], (rank, p.name)
    assert units[0].reshard_after_forward and units[1].reshard_after_forward


def test_collective_bytes_equal_the_theory_exactly(two_ranks):
    from fsdp.comm import expected

    for (reshard, reduce_every, _), result in (
        (k, v) for k, v in two_ranks[0].items() if isinstance(k, tuple)
    ):
        units = result["units"]
        theory = expected(units, 2, 2, compute_bytes=2, reduce_bytes=4, reduce_every_microbatch=reduce_every)
        for kind in ("all-gather", "reduce-scatter"):
            assert result["totals"][kind]["payload_bytes"] == theory[kind]["payload_bytes"], (
                kind,
                reshard,
                reduce_every,
            )
            assert result["totals"][kind]["sent_bytes"] == theory[kind]["payload_bytes"] / 2  # ring: (N-1)/N
        for name, (numel, reshards) in units.items():
            gathers = 2 * (1 + reshards)  # per micro-batch: forward, and backward if freed after forward
            assert result["payload"][("all-gather", name)] == gathers * numel * 2  # bf16
            assert (
                result["payload"][("reduce-scatter", name)] == (2 if reduce_every else 1) * numel * 4
            )  # fp32
        # Two all-reduces: the per-parameter norms for clipping (one fp32 per parameter: 2 x 9 +
        # embedding + final norm) and the loss (fp32). The step's token counts need none: the
        # loader knows them on the host.
        assert result["totals"]["all-reduce"] == {
            "calls": 2,
            "payload_bytes": 20 * 4 + 4,
            "sent_bytes": 84.0,
        }
    # The numbers behind the "3 x": forward gather + backward gather + fp32 reduce-scatter.
    default = two_ranks[0][(True, False, "none")]
    model_bf16 = sum(n for n, _ in default["units"].values()) * 2
    assert (
        default["totals"]["all-gather"]["payload_bytes"] == 2 * 2 * model_bf16
    )  # 2 micro-batches x 2 gathers
    assert default["totals"]["reduce-scatter"]["payload_bytes"] == 2 * model_bf16
    # reshard_after_forward=false: no backward all-gather; checkpointing adds none (the unit is gathered).
    assert two_ranks[0][(False, False, "none")]["totals"]["all-gather"]["payload_bytes"] == 2 * model_bf16
    full = two_ranks[0][(True, False, "full")]["totals"]
    assert full == default["totals"]


def test_the_timeouts_reach_the_mesh_groups(two_ranks):
    """comm.init_timeout_s and comm.train_timeout_s bound HSDP's own groups too, where FSDP's
    collectives run, not only the default group."""
    for rank in two_ranks:
        assert rank["timeouts"] == {"init": [1234.0] * 3, "set": [56.0] * 3}


def test_hsdp_collective_bytes_equal_the_theory_exactly(four_ranks):
    """4 gloo ranks as 2 replicas x 2 shards: gathers and reduce-scatters within a replica, then
    each rank's reduce-scatter output all-reduced across the replicas, booked to its unit."""
    from fsdp.comm import expected

    result = four_ranks[0]["hsdp comm"]
    units = result["units"]
    theory = expected(units, 4, 2, compute_bytes=2, reduce_bytes=4, replicate=2)
    for kind in ("all-gather", "reduce-scatter", "all-reduce"):
        assert result["fsdp"][kind]["payload_bytes"] == theory[kind]["payload_bytes"], kind
        assert result["fsdp"][kind]["sent_bytes"] == theory[kind]["sent_bytes"], kind
    for name, (numel, _) in units.items():
        assert numel % 2 == 0  # padded over the 2 ranks of a shard group, not the 4 of the world
        assert (
            result["payload"][("all-gather", name)] == 2 * 2 * numel * 2
        )  # 2 micro-batches x 2 gathers, bf16
        assert result["payload"][("reduce-scatter", name)] == numel * 4  # once, fp32
        assert result["payload"][("all-reduce", name)] == numel // 2 * 4  # this rank's shard, fp32
        # Ring shares: (S-1)/S = 1/2 within the shard group, 2 (R-1)/R = 1 across the replicas.
        assert result["sent"][("reduce-scatter", name)] == numel * 4 / 2
        assert result["sent"][("all-reduce", name)] == numel // 2 * 4
    # The step's own all-reduces are as on a 1-D mesh: the per-parameter norms (over a shard
    # group: the replicas hold the same) and the loss.
    assert result["totals"]["all-reduce"]["calls"] == len(units) + 2
    assert (
        result["totals"]["all-reduce"]["payload_bytes"] == theory["all-reduce"]["payload_bytes"] + 20 * 4 + 4
    )
    assert result["table"].count("  exact") == 3 and "step all-reduce" in result["table"]


@pytest.mark.fast
def test_flops_per_token_of_llama3_8b():
    from fsdp.flops import FlopsModel, device_peak_tflops
    from fsdp.memory import ModelShape
    from fsdp.model import load_hf_config

    config = load_hf_config("conf/model/llama3-8b.json")
    shape = ModelShape.from_hf_config(config)
    # By hand: per layer q, k, v, o (4096 x (4096 + 1024 + 1024 + 4096)), 3 MLP matrices 4096 x 14336,
    # 2 norms; 32 layers, the final norm and the (untied) head 128256 x 4096; the input table excluded.
    layer = 4096 * 10240 + 3 * 4096 * 14336 + 2 * 4096
    matmul = 32 * layer + 4096 + 128256 * 4096
    flops = FlopsModel.from_shape(shape)
    assert flops.matmul_params == matmul == 7_504_924_672
    assert flops.model_flops_per_token(2048) == 6 * matmul + 12 * 32 * 32 * 128 * 2048 == 48_250_773_504
    # Full checkpointing recomputes every layer's forward but its down projection (nothing in
    # backward needs its output: torch's checkpoint stops before it); the chunked loss, the head.
    recompute = 32 * (2 * (layer - 4096 * 14336) + 4 * 32 * 128 * 2048) + 2 * 128256 * 4096
    assert flops.hardware_flops_per_token(2048, 32) == flops.model_flops_per_token(2048) + recompute
    assert (
        device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
        and device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    )
    assert device_peak_tflops("cpu") is None and device_peak_tflops("cpu", 1.5) == 1.5


@pytest.mark.fast
def test_flop_counter_sees_full_recompute_and_none_under_selective():
    """torch's FlopCounterMode around a real step's forward and backward (tiny Llama, fp32, one
    process): full checkpointing adds exactly the recomputed forwards that fsdp/flops.py adds to the
    hardware FLOPs; selective adds nothing, op by op; the throughput line counts as much per mode."""
    import math

    import torch
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    from config.settings import throughput
    from fsdp.activation import apply_activation_checkpointing
    from fsdp.flops import FlopsModel
    from fsdp.memory import ModelShape
    from fsdp.model import TrainableCausalLM, build_model, find_decoder_layer_names

    aten = torch.ops.aten
    # The counter knows CUDA's attention kernels, not the CPU's: the same shapes, the same formula.
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *_, **__: (
            sdpa_backward_flop_count(g, q, k, v)
        ),
    }
    config, batch, seq = tiny_config(vocab_size=VOCAB), 2, 64
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    counted = {}
    for mode in ("none", "selective", "full"):
        model = TrainableCausalLM(build_model(config, torch.float32, on_meta=False, seed=0), 32)
        apply_activation_checkpointing(model, find_decoder_layer_names(model), mode)
        with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
            model(ids, None, ids).backward()
        counted[mode] = counter.get_flop_counts()["Global"]
    shape = ModelShape.from_hf_config(config)
    flops, tokens, layers = FlopsModel.from_shape(shape), batch * seq, shape.layers
    assert counted["none"][aten._scaled_dot_product_flash_attention_for_cpu] > 0  # attention counted
    assert counted["selective"] == counted["none"]  # every op's FLOPs: no matmul, no attention again
    # The convention counts a layer's norm weights as matmul parameters; the counter counts matmuls.
    norms = sum(math.prod(s) for s in shape.unit_shapes()[1] if len(s) == 1)
    recompute = tokens * (
        flops.hardware_flops_per_token(seq, layers) - flops.hardware_flops_per_token(seq, 0)
    )
    assert (
        sum(counted["full"].values()) - sum(counted["none"].values())
        == recompute - tokens * layers * 2 * norms
    )
    for mode, recomputed in (("none", 0), ("selective", 0), ("full", layers)):
        cfg = OmegaConf.create(
            {"activation_checkpointing": {"mode": mode, "every_k": 2}, "metrics": {"peak_tflops": None}}
        )
        assert throughput(cfg, shape, torch.device("cpu")).recomputed == recomputed, mode


@pytest.mark.fast
@pytest.mark.parametrize("nodes", [1, 2])
def test_explain_prints_the_layout_order_and_exact_bytes(capsys, nodes):
    import explain

    code = explain.main(
        [
            "preset=tiny",
            "memory.world_size=4",
            f"memory.nodes={nodes}",
            "+model.config_overrides.vocab_size=250",
            "batch.max_seq_length=64",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "unit 2: causal_lm.model.layers.1, laid out like unit 1" in out  # folded into one line
    assert "forward  all-gather root" in out and "backward reduce-scatter root" in out
    if nodes == 1:
        assert "1-D mesh: 4 ranks each hold 1/4 of the model state" in out
        assert "FSDP units over 4 ranks" in out
        assert (
            "causal_lm.model.embed_tokens.weight" in out
            and "-> rank 0 [63, 64], rank 1 [63, 64], rank 2 [63, 64], rank 3 [61, 64] (+2 padding rows)"
            in out
        )
        assert out.count("  exact") == 2
    else:  # fsdp.replicate=auto: one replica per node, 2 x 2
        assert "2-D mesh (HSDP): 2 replicas x 2 shards" in out and "FSDP units over 2 ranks" in out
        assert "[250, 64] -> each rank [125, 64]" in out
        assert "backward all-reduce root" in out
        assert out.count("  exact") == 3  # the all-reduce across replicas too
        assert "MiB across the 2 replicas (the all-reduce of its gradient shard)" in out
