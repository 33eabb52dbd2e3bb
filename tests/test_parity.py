"""Sharded training equals unsharded training: world size, accumulation and checkpointing change nothing.

The reference is deliberately independent of our step: one process, no FSDP, the whole global batch
in one forward (padded to its longest sequence), torch.optim.AdamW. Our side is train.py's
`train_step` with FSDP2 on spawned gloo ranks and fsdp/adamw.py. fp32 everywhere, ragged lengths.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import ragged_examples, run_distributed, tiny_config

STEPS = 5
GLOBAL_SEQUENCES = 8
# The classic recipe's learning rate. Adam's first steps move every weight by about lr * sign(grad),
# so a larger lr turns fp32 rounding noise in near-zero gradients into visible drift. AdamW is also
# blind to the scale of the gradients, so the gradient norm is compared on its own.
LR, BETAS, EPS, WD, CLIP = 2e-5, (0.9, 0.95), 1e-8, 0.1, 1.0


def examples():
    return ragged_examples(GLOBAL_SEQUENCES * STEPS, seed=1)


def reference_run() -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    from batch import BatchGeometry
    from data.loader import DistributedBatchLoader
    from fsdp.adamw import param_groups
    from fsdp.model import TrainableCausalLM, build_model

    model = TrainableCausalLM(build_model(tiny_config(), torch.float32, on_meta=False, seed=0))
    optimizer = torch.optim.AdamW(param_groups(model, WD), lr=LR, betas=BETAS, eps=EPS, foreach=False)
    loader = DistributedBatchLoader(
        examples(), BatchGeometry(GLOBAL_SEQUENCES, 1, 1, 64), 0, seed=0, pad_id=0
    )
    losses, grad_norms = [], []
    for _ in range(STEPS):
        (batch,) = loader.next_step()
        loss = model(batch.input_ids, batch.position_ids, batch.labels) / batch.num_target_tokens
        loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.causal_lm.named_parameters()}, grad_norms


def sharded_run(
    d,
    micro: int,
    accum: int,
    precision: str = "fp32",
    checkpointing: str = "none",
    every_k: int = 1,
    switch: tuple | None = None,
):
    """Our training step under FSDP on this rank; returns losses, and on rank 0 the gathered params.
    `switch=(step, d2, folder)`: after `step` steps, checkpoint to `folder`, and go on from it with a
    model and optimizer built on d2's mesh."""
    from batch import BatchGeometry
    from data.loader import DistributedBatchLoader
    from fsdp.activation import clean_name
    from fsdp.adamw import AdamW, init_state, param_groups
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.step import train_step

    model = build_sharded_model(
        tiny_config(), d, BuildSettings(precision=precision, checkpointing=checkpointing, every_k=every_k)
    )
    optimizer = AdamW(param_groups(model, WD), lr=LR, betas=BETAS, eps=EPS)
    geometry = BatchGeometry(micro, accum, d.world_size, 64)
    assert geometry.global_sequences == GLOBAL_SEQUENCES
    loader = DistributedBatchLoader(examples(), geometry, d.rank, seed=0, pad_id=0)
    stats = [
        train_step(model, optimizer, loader.next_step(), CLIP) for _ in range(switch[0] if switch else STEPS)
    ]
    if switch:
        from pathlib import Path

        from fsdp.checkpoint import load_checkpoint, save_checkpoint

        step, d2, folder = switch
        saved = save_checkpoint(Path(folder), step, model, optimizer, meta={}, is_main=d.is_main)["path"]
        settings = BuildSettings(precision=precision, checkpointing=checkpointing, every_k=every_k)
        model = build_sharded_model(tiny_config(), d2, settings, load_weights=False)
        optimizer = AdamW(param_groups(model, WD), lr=LR, betas=BETAS, eps=EPS)
        init_state(optimizer)
        load_checkpoint(saved, model, optimizer)
        stats += [train_step(model, optimizer, loader.next_step(), CLIP) for _ in range(STEPS - step)]
    params = {clean_name(n): p.full_tensor() for n, p in model.causal_lm.named_parameters()}
    return [s.loss for s in stats], (params if d.rank == 0 else None), [s.grad_norm for s in stats]


def world2_scenarios(d):
    return {
        "micro2_accum2": sharded_run(d, 2, 2),
        "micro1_accum4": sharded_run(d, 1, 4),
        "micro4_accum1": sharded_run(d, 4, 1),
        "checkpoint_full": sharded_run(d, 2, 2, checkpointing="full"),
        "checkpoint_every_2": sharded_run(d, 2, 2, checkpointing="every_k", every_k=2),
        "checkpoint_selective": sharded_run(d, 2, 2, checkpointing="selective"),
        "mixed": sharded_run(d, 2, 2, precision="mixed"),
        "bf16": sharded_run(d, 2, 2, precision="bf16"),
        "bytes_mixed": model_state_bytes(d, "mixed"),
        "bytes_bf16": model_state_bytes(d, "bf16"),
    }


def model_state_bytes(d, precision: str) -> dict[str, int]:
    """Bytes this rank holds in sharded params, sharded grads and optimizer state after one step."""
    from batch import BatchGeometry
    from data.loader import DistributedBatchLoader
    from fsdp.adamw import AdamW, param_groups
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.model import count_parameters, shard_rows
    from fsdp.step import train_step

    model = build_sharded_model(tiny_config(vocab_size=257), d, BuildSettings(precision=precision))
    optimizer = AdamW(param_groups(model, WD), lr=LR)
    loader = DistributedBatchLoader(
        examples(), BatchGeometry(2, 2, d.world_size, 64), d.rank, seed=0, pad_id=0
    )
    train_step(model, optimizer, loader.next_step(), CLIP)

    def local_bytes(tensors) -> int:
        return sum(t.to_local().numel() * t.element_size() for t in tensors)

    params = list(model.parameters())
    # zero_grad(set_to_none) freed the grads; one more backward without a step brings them back.
    batch = loader.next_step()[0]
    model(batch.input_ids, batch.position_ids, batch.labels).backward()

    def rows_here(p) -> int:
        start, end = shard_rows(p.shape[0], d.world_size, d.rank)
        return (end - start) * (p.numel() // p.shape[0])

    return {
        "params": count_parameters(model),
        "local params": sum(rows_here(p) for p in params),
        "sharded params": local_bytes(params),
        "sharded grads": local_bytes(p.grad for p in params),
        "optimizer state": local_bytes(
            t for state in optimizer.state.values() for t in (state["exp_avg"], state["exp_avg_sq"])
        ),
    }


@pytest.fixture(scope="module")
def reference():
    return reference_run()


@pytest.fixture(scope="module")
def world2():
    ranks = run_distributed(world2_scenarios, 2)
    # Every rank reports the same (all-reduced) loss.
    for name in ranks[0]:
        if not name.startswith("bytes"):
            assert ranks[0][name][0] == ranks[1][name][0], name
    return ranks[0]


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def test_world_size_2_matches_unsharded_reference(reference, world2):
    ref_losses, ref_params, ref_grad_norms = reference
    losses, params, grad_norms = world2["micro2_accum2"]
    initial = reference_initial_params()
    assert max_param_diff(ref_params, initial) > 2 * STEPS * LR * 0.5  # the reference trained
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5
    assert max_param_diff(params, ref_params) <= 1e-4
    # Gradients summed over ranks (not averaged) and divided by the global token count: same norm.
    assert max_rel_diff(grad_norms, ref_grad_norms) <= 1e-5
    assert min(ref_grad_norms) > CLIP  # so clipping across shards was exercised


def reference_initial_params() -> dict[str, torch.Tensor]:
    from fsdp.model import build_model

    return dict(build_model(tiny_config(), torch.float32, on_meta=False, seed=0).named_parameters())


def test_accumulation_equals_larger_micro_batch(reference, world2):
    losses_a, params_a, norms_a = world2["micro1_accum4"]
    losses_b, params_b, norms_b = world2["micro4_accum1"]
    assert max(abs(a - b) for a, b in zip(losses_a, losses_b, strict=True)) <= 1e-5
    assert max_param_diff(params_a, params_b) <= 1e-4
    assert max_rel_diff(norms_a, norms_b) <= 1e-5
    assert max(abs(a - b) for a, b in zip(losses_a, reference[0], strict=True)) <= 1e-5


@pytest.mark.parametrize("scenario", ["checkpoint_full", "checkpoint_every_2"])
def test_activation_checkpointing_changes_nothing(world2, scenario):
    base_losses, base_params, _ = world2["micro2_accum2"]
    losses, params, _ = world2[scenario]
    assert max(abs(a - b) for a, b in zip(losses, base_losses, strict=True)) <= 1e-6
    assert max_param_diff(params, base_params) <= 1e-6


def test_selective_checkpointing_learns_bitwise_what_none_and_full_learn(world2):
    """fp32, 5 steps at 2 ranks: the kept matmul and attention outputs are the forward's own
    tensors and the recomputed elementwise ops run on the same inputs, so nothing rounds apart."""
    none, selective, full = (world2[s] for s in ("micro2_accum2", "checkpoint_selective", "checkpoint_full"))
    assert selective[0] == none[0] == full[0]  # per-step losses, exactly
    assert selective[2] == none[2] == full[2]  # gradient norms, exactly
    assert max_param_diff(selective[1], none[1]) == 0.0 == max_param_diff(full[1], none[1])
    assert len(set(none[0])) == STEPS  # the steps differ: the runs trained


def test_mixed_precision_tracks_fp32(reference, world2):
    losses, params, _ = world2["mixed"]
    # bf16 compute: same trajectory to bf16 accuracy; master weights stay fp32.
    assert max(abs(a - b) for a, b in zip(losses, reference[0], strict=True)) <= 2e-2
    assert all(p.dtype == torch.float32 for p in params.values())


def test_pure_bf16_trains_in_bf16(reference, world2):
    losses, params, _ = world2["bf16"]
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert max(abs(a - b) for a, b in zip(losses, reference[0], strict=True)) <= 5e-2


@pytest.mark.parametrize(("precision", "per_param"), [("mixed", (4, 4, 8)), ("bf16", (2, 2, 4))])
def test_model_state_bytes_per_rank(world2, precision, per_param):
    """16 bytes/param (mixed) or 8 (bf16) in all, split over the ranks: 257 vocabulary rows split 129 + 128."""
    from fsdp.precision import PRECISIONS

    r0 = world2[f"bytes_{precision}"]
    assert tuple(PRECISIONS[precision].bytes_per_param.values()) == per_param
    # Every parameter's dim 0 is split by torch.chunk, so rank 0 holds ceil(rows / 2) rows of each:
    # a little over half of the parameters. That is the only deviation from bytes/param x params / N.
    assert r0["params"] / 2 < r0["local params"] < r0["params"] / 2 * 1.01
    for category, bytes_per_param in PRECISIONS[precision].bytes_per_param.items():
        assert r0[category] == bytes_per_param * r0["local params"], category


def world4_scenarios(d, folder: str) -> dict:
    """At 4 ranks: the 1-D mesh, HSDP (2 replicas x 2 shards), and a run that switches mesh through
    a checkpoint after 2 steps, each way (DCP reshards the state between the two layouts)."""
    import dataclasses

    from fsdp.dist import make_mesh

    hsdp = dataclasses.replace(d, mesh=make_mesh("cpu", d.world_size, replicate=2))
    assert (hsdp.replicas, hsdp.shard_size) == (2, 2)
    return {
        "fsdp": sharded_run(d, 1, 2),
        "hsdp": sharded_run(hsdp, 1, 2),
        "fsdp_to_hsdp": sharded_run(d, 1, 2, switch=(2, hsdp, f"{folder}/to-hsdp")),
        "hsdp_to_fsdp": sharded_run(hsdp, 1, 2, switch=(2, d, f"{folder}/to-fsdp")),
    }


@pytest.fixture(scope="module")
def world4(four_ranks):  # tests/conftest.py: one spawn of 4 ranks for the suite
    return four_ranks[0]["mesh"]


@pytest.mark.parametrize("scenario", ["fsdp", "hsdp", "fsdp_to_hsdp", "hsdp_to_fsdp"])
def test_world_size_4_matches_the_reference_on_either_mesh(reference, world4, scenario):
    losses, params, grad_norms = world4[scenario]
    assert max(abs(a - b) for a, b in zip(losses, reference[0], strict=True)) <= 1e-5
    assert max_param_diff(params, reference[1]) <= 1e-4
    assert max_rel_diff(grad_norms, reference[2]) <= 1e-5
