"""fsdp/adamw.py against torch.optim.AdamW, its three implementations against each other, its parameter groups."""

from __future__ import annotations

import pytest
import torch

from fsdp.adamw import IMPLS, AdamW, init_state, make_adamw, param_groups
from fsdp.model import TrainableCausalLM, build_model
from tests.helpers import tiny_config


def _model(seed: int = 0) -> TrainableCausalLM:
    return TrainableCausalLM(build_model(tiny_config(), torch.float32, on_meta=False, seed=seed))


def test_matches_torch_adamw_over_10_steps():
    ours, theirs = _model(), _model()
    opt_ours = AdamW(param_groups(ours, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    opt_theirs = torch.optim.AdamW(
        param_groups(theirs, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters(), strict=True):
            grad = torch.randn(p_ours.shape, generator=g) * 1e-2
            p_ours.grad, p_theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
    diff = max(
        (a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters(), strict=True)
    )
    moved = max(
        (a - b).abs().max().item() for a, b in zip(ours.parameters(), _model().parameters(), strict=True)
    )
    assert diff <= 1e-6
    assert moved > 5e-3  # ten steps of lr 1e-3 moved the weights
    state = opt_ours.state[next(ours.parameters())]
    assert state["step"].item() == 10.0
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


def test_param_groups_exempt_norms_biases_and_embeddings():
    model = _model()
    decay, no_decay = param_groups(model, 0.1)
    embedding = model.causal_lm.model.embed_tokens.weight
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert any(p is embedding for p in no_decay["params"])
    assert all(p.ndim == 1 or p is embedding for p in no_decay["params"])
    n_norms = sum(1 for n, _ in model.named_parameters() if "norm" in n)
    assert len(no_decay["params"]) == n_norms + 1  # + the (tied) embedding
    decay_all, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert any(p is embedding for p in decay_all["params"])


def dcp_round_trip(d, folder: str) -> dict:
    """Optimizer state of our AdamW on sharded params, saved with DCP and loaded into fresh objects."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from batch import BatchGeometry
    from data.loader import DistributedBatchLoader
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.step import train_step
    from tests.helpers import ragged_examples

    def fresh():
        model = build_sharded_model(tiny_config(), d, BuildSettings(precision="mixed"), seed=1)
        return model, AdamW(param_groups(model, 0.1), lr=1e-3)

    model, optimizer = fresh()
    loader = DistributedBatchLoader(ragged_examples(16), BatchGeometry(2, 1, d.world_size, 64), d.rank, 0, 0)
    train_step(model, optimizer, loader.next_step(), 1.0)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)

    model2, optimizer2 = fresh()
    train_step(model2, optimizer2, loader.next_step(), 1.0)  # create state to overwrite
    model_sd2, optim_sd2 = get_state_dict(model2, optimizer2)
    state = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model2, optimizer2, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def flat(opt):
        return [
            (s["step"].item(), s["exp_avg"].full_tensor(), s["exp_avg_sq"].full_tensor())
            for s in opt.state.values()
        ]

    same = all(
        a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        for a, b in zip(flat(optimizer), flat(optimizer2), strict=True)
    )
    sharded = all(type(s["exp_avg"]).__name__ == "DTensor" for s in optimizer.state.values())
    return {"same": same, "sharded": sharded, "n": len(optimizer2.state)}


def test_optimizer_state_goes_through_dcp(tmp_path):
    from tests.helpers import run_distributed

    ranks = run_distributed(dcp_round_trip, 2, str(tmp_path / "ckpt"))
    for r in ranks:
        assert r["same"] and r["sharded"] and r["n"] == 2 * 9 + 2  # 9 tensors a layer, embedding, final norm


# --- loop, foreach, fused: one arithmetic, three implementations, on a sharded model ------------

IMPL_STEPS = 6


def _state_of(model, optimizer) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(step, whole m, whole v) of every parameter, in the model's order."""
    rows = []
    for p in model.parameters():
        s = optimizer.state[p]
        rows.append((s["step"], s["exp_avg"].full_tensor(), s["exp_avg_sq"].full_tensor()))
    return rows


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def impls_on_a_sharded_model(d, folder: str) -> dict:
    """Each impl trains the same fp32 sharded model on the same batches; then the loop's state, saved
    with DCP, is loaded into the other two and all three take one more step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from batch import BatchGeometry
    from data.loader import DistributedBatchLoader
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.step import train_step
    from tests.helpers import ragged_examples

    loader = DistributedBatchLoader(ragged_examples(32), BatchGeometry(2, 1, d.world_size, 64), d.rank, 0, 0)
    batches = [loader.next_step() for _ in range(IMPL_STEPS + 1)]

    def build():
        return build_sharded_model(tiny_config(), d, BuildSettings(precision="fp32"), seed=1)

    def optimizer_for(impl: str, model) -> torch.optim.Optimizer:
        groups = param_groups(model, 0.1)
        if impl == "torch fused":
            return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
        return make_adamw(groups, impl, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)

    initial = [p.full_tensor() for p in build().parameters()]
    runs = {}
    for impl in (*IMPLS, "torch fused"):
        model = build()
        optimizer = optimizer_for(impl, model)
        init_state(optimizer)
        for micro_batches in batches[:IMPL_STEPS]:
            train_step(model, optimizer, micro_batches, 1.0)
        runs[impl] = (model, optimizer)
    weights = {impl: [p.full_tensor() for p in m.parameters()] for impl, (m, _) in runs.items()}
    out = {
        "largest weight": max(w.abs().max().item() for w in weights["loop"]),
        "moved": _max_diff(weights["loop"], initial),
        "diff": {impl: _max_diff(weights[impl], weights["loop"]) for impl in runs},
        "fused vs torch fused": _max_diff(weights["fused"], weights["torch fused"]),
        "steps": {impl: sorted({s[0].item() for s in _state_of(*runs[impl])}) for impl in runs},
        "step dtypes": {impl: {s[0].dtype for s in _state_of(*runs[impl])} for impl in runs},
    }
    del runs["torch fused"]  # its param_groups have seven more keys: DCP will not load ours into it

    model_sd, optim_sd = get_state_dict(*runs["loop"])
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
    loop_state = _state_of(*runs["loop"])
    out["loaded equal"] = {}
    for impl in ("foreach", "fused"):
        model, optimizer = runs[impl]
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        out["loaded equal"][impl] = all(
            a[0].item() == b[0].item() and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
            for a, b in zip(_state_of(model, optimizer), loop_state, strict=True)
        )
    for model, optimizer in runs.values():
        train_step(model, optimizer, batches[IMPL_STEPS], 1.0)
    weights = {impl: [p.full_tensor() for p in m.parameters()] for impl, (m, _) in runs.items()}
    out["diff after load"] = {impl: _max_diff(weights[impl], weights["loop"]) for impl in IMPLS}
    return out


def test_foreach_and_fused_match_the_loop_on_a_sharded_model(tmp_path):
    from tests.helpers import run_distributed

    ranks = run_distributed(impls_on_a_sharded_model, 2, str(tmp_path / "ckpt"))
    for r in ranks:
        assert r["moved"] > 5e-3  # six steps of lr 1e-3 moved the weights
        assert set(r["steps"]) == {*IMPLS, "torch fused"}
        assert all(steps == [float(IMPL_STEPS)] for steps in r["steps"].values())
        assert all(dtypes == {torch.float32} for dtypes in r["step dtypes"].values())
        # foreach: the same operations in the same order (on CPU, the very same kernels: 0.0).
        assert r["diff"]["foreach"] <= 1e-6
        # fused: one kernel that orders the arithmetic its own way, so each step may round the
        # update differently; at most one float32 ulp of the largest weight (the norms, ~1.0) per
        # step. Measured: 1.2e-7 after 6 steps, one ulp at 1.0, against a bound of 7.2e-7.
        ulp = torch.finfo(torch.float32).eps * r["largest weight"]
        assert r["diff"]["fused"] <= IMPL_STEPS * ulp
        assert r["fused vs torch fused"] == 0.0  # our FusedAdamW is torch.optim.AdamW(fused=True)'s kernel
        # The loop's DCP checkpoint resumes in the other two: same state, then the same next step.
        assert r["loaded equal"] == {"foreach": True, "fused": True}
        assert r["diff after load"]["foreach"] <= 1e-6
        assert r["diff after load"]["fused"] <= ulp
    assert ranks[0] == ranks[1]  # whole tensors (full_tensor), so every rank sees the same numbers


def test_make_adamw_builds_each_impl_and_init_state_allocates_before_the_first_step():
    for impl in IMPLS:
        model = _model()
        optimizer = make_adamw(param_groups(model, 0.1), impl, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        init_state(optimizer)
        states = [optimizer.state[p] for p in model.parameters()]
        assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in states), impl
        assert all(s["step"].item() == 0.0 and s["step"].dtype == torch.float32 for s in states), impl
        assert all(
            not s["exp_avg"].any() and s["exp_avg_sq"].shape == p.shape
            for s, p in zip(states, model.parameters(), strict=True)
        ), impl
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    torch_fused = torch.optim.AdamW(param_groups(_model(), 0.1), fused=True)
    init_state(torch_fused)
    assert all(s["step"].dtype == torch.float32 for s in torch_fused.state.values())
    assert len(torch_fused.state) == sum(1 for _ in _model().parameters())
    with pytest.raises(ValueError, match=r"optim\.impl='apex'"):
        make_adamw(param_groups(_model(), 0.1), "apex")
