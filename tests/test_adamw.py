"""fsdp/adamw.py against torch.optim.AdamW, its three implementations against each other, its parameter groups."""

from __future__ import annotations

import pytest
import torch

from fsdp.adamw import IMPLS, AdamW, init_state, make_adamw, param_groups
from fsdp.model import TrainableCausalLM, build_model
from tests.helpers import tiny_config


def _model(seed: int = 0) -> TrainableCausalLM:
    return TrainableCausalLM(build_model(tiny_config(), torch.float32, on_meta=False, seed=seed))


@pytest.mark.fast
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


@pytest.mark.fast
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


def across_state_dtypes(d, folder: str) -> dict:
    """A checkpoint saved with each state dtype (optim.state_dtype null, bf16), resumed with the other
    through the resume's own load (fsdp/checkpoint.py load_checkpoint), then one more step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from batch import BatchGeometry
    from data.loader import DistributedBatchLoader
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.checkpoint import load_checkpoint
    from fsdp.step import train_step
    from tests.helpers import ragged_examples

    def fresh(state_dtype):
        model = build_sharded_model(tiny_config(), d, BuildSettings(precision="fp32"), seed=1)
        optimizer = make_adamw(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), state_dtype=state_dtype)
        init_state(optimizer)
        return model, optimizer

    loader = DistributedBatchLoader(ragged_examples(16), BatchGeometry(2, 1, d.world_size, 64), d.rank, 0, 0)
    batches = [loader.next_step() for _ in range(2)]
    out = {}
    for saved, resumed in ((None, "bf16"), ("bf16", None)):
        model, optimizer = fresh(saved)
        train_step(model, optimizer, batches[0], 1.0)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        checkpoint = f"{folder}/{saved}"
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=checkpoint)
        model2, optimizer2 = fresh(resumed)
        load_checkpoint(checkpoint, model2, optimizer2)
        before, after = _state_of(model, optimizer), _state_of(model2, optimizer2)
        dtypes = {t.dtype for _, m, v in after for t in (m, v)}
        steps = {s.item() for s, _, _ in after}
        equal = all(
            torch.equal(m.to(m2.dtype), m2) and torch.equal(v.to(v2.dtype), v2)
            for (_, m, v), (_, m2, v2) in zip(before, after, strict=True)
        )
        train_step(model2, optimizer2, batches[1], 1.0)
        out[f"{saved} -> {resumed}"] = {
            "dtypes": dtypes,
            "equal": equal,
            "steps": steps,
            "dtypes after a step": {t.dtype for _, m, v in _state_of(model2, optimizer2) for t in (m, v)},
        }
    return out


def dcp_jobs(d, folder: str) -> dict:
    """Both DCP checks on one spawn of 2 ranks (a spawn costs seconds on 2 cores)."""
    return {
        "round trip": dcp_round_trip(d, f"{folder}/same"),
        "state dtypes": across_state_dtypes(d, f"{folder}/dtypes"),
    }


@pytest.fixture(scope="module")
def dcp_ranks(tmp_path_factory) -> list[dict]:
    from tests.helpers import run_distributed

    return run_distributed(dcp_jobs, 2, str(tmp_path_factory.mktemp("dcp")))


def test_optimizer_state_goes_through_dcp(dcp_ranks):
    for r in (rank["round trip"] for rank in dcp_ranks):
        assert r["same"] and r["sharded"] and r["n"] == 2 * 9 + 2  # 9 tensors a layer, embedding, final norm


def test_resuming_with_another_state_dtype_casts_the_state_on_load(dcp_ranks):
    """optim.state_dtype may change across a resume: DCP copies the saved m and v into this run's
    tensors, and AdamW.load_state_dict keeps them there (torch.optim would cast them to fp32)."""
    for r in (rank["state dtypes"] for rank in dcp_ranks):
        down, up = r["None -> bf16"], r["bf16 -> None"]
        assert down["dtypes"] == down["dtypes after a step"] == {torch.bfloat16}
        assert up["dtypes"] == up["dtypes after a step"] == {torch.float32}
        # fp32 -> bf16: the saved moments rounded once; bf16 -> fp32: exactly the saved ones.
        assert down["equal"] and up["equal"]
        assert down["steps"] == up["steps"] == {1.0}


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


@pytest.mark.fast
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


# --- optim.state_dtype: m and v in bf16 beside fp32 weights, the update in fp32 ------------------


@pytest.mark.fast
def test_bf16_state_updates_in_fp32_and_rounds_only_the_stored_moments():
    steps, lr = 10, 1e-3
    models = {(impl, dtype): _model() for impl in ("loop", "foreach") for dtype in (None, "bf16")}
    optimizers = {
        key: make_adamw(param_groups(m, 0.1), key[0], lr=lr, betas=(0.9, 0.95), state_dtype=key[1])
        for key, m in models.items()
    }
    initial = [p.detach().clone() for p in _model().parameters()]
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in initial]
        for key, model in models.items():
            for p, grad in zip(model.parameters(), grads, strict=True):
                p.grad = grad.clone()
            optimizers[key].step()
        if step == 1:
            # From zero moments the first update is the fp32 one bit for bit: it runs on the fp32
            # m and v before they are stored; what is stored is them, rounded once.
            fp32, bf16 = (list(models["loop", d].parameters()) for d in (None, "bf16"))
            assert all(torch.equal(a, b) for a, b in zip(fp32, bf16, strict=True))
            for a, b in zip(fp32, bf16, strict=True):
                sa, sb = optimizers["loop", None].state[a], optimizers["loop", "bf16"].state[b]
                assert sb["exp_avg"].dtype == sb["exp_avg_sq"].dtype == torch.bfloat16
                assert torch.equal(sa["exp_avg"].bfloat16(), sb["exp_avg"])
                assert torch.equal(sa["exp_avg_sq"].bfloat16(), sb["exp_avg_sq"])

    def weights(impl, dtype):
        return list(models[impl, dtype].parameters())

    # On CPU foreach runs the loop's kernels: the same numbers with either state dtype.
    for dtype in (None, "bf16"):
        pairs = zip(weights("loop", dtype), weights("foreach", dtype), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
    fp32, bf16 = weights("loop", None), weights("loop", "bf16")
    assert all(p.dtype == torch.float32 for p in bf16)  # the master weights stay fp32
    moved = max((a - w).abs().max().item() for a, w in zip(fp32, initial, strict=True))
    apart = max((a - b).abs().max().item() for a, b in zip(fp32, bf16, strict=True))
    # Every later step runs on m and v as stored: each store rounds by at most half a bf16 ulp,
    # 2^-9 of the value, and the rounding of earlier stores decays by beta. So the two runs part
    # by about 2^-8 of how far the weights moved (measured: 0.44% after 10 steps, 4.2e-5 of
    # 9.6e-3); 2^-7 bounds it, and the moments are rounded (apart > 0).
    assert moved > 5e-3
    assert 0 < apart <= 2**-7 * moved


@pytest.mark.fast
def test_state_dtype_is_refused_where_adamw_cannot_keep_it():
    # torch's fused kernel takes m and v in the parameters' dtype only.
    with pytest.raises(ValueError, match=r"optim\.impl=fused: .* not optim\.state_dtype=bf16"):
        make_adamw(param_groups(_model(), 0.1), "fused", betas=(0.9, 0.95), state_dtype="bf16")
    assert make_adamw(param_groups(_model(), 0.1), "fused", state_dtype="fp32")  # the params' own: fine
    # Moments wider than bf16 weights: the update runs in the weights' dtype.
    bf16_model = TrainableCausalLM(build_model(tiny_config(), torch.bfloat16, on_meta=False, seed=0))
    with pytest.raises(ValueError, match=r"optim\.state_dtype=fp32: wider than the bf16 parameters"):
        make_adamw(param_groups(bf16_model, 0.1), state_dtype="fp32")
    # beta2 = 0.999 moves v by 0.1% of the way per step, under half a bf16 ulp: v never decays.
    with pytest.raises(ValueError, match=r"optim\.betas beta2=0\.999 moves m or v by 0\.001"):
        make_adamw(param_groups(_model(), 0.1), betas=(0.9, 0.999), state_dtype="bf16")
    v = {beta: torch.ones((), dtype=torch.bfloat16) for beta in (0.999, 1 - 2**-8)}
    for _ in range(100):
        v = {beta: (x.float() * beta).bfloat16() for beta, x in v.items()}
    assert v[0.999].item() == 1.0 and v[1 - 2**-8].item() < 0.7  # 100 steps without gradient
