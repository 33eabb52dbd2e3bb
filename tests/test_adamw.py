"""fsdp/adamw.py against torch.optim.AdamW, and its parameter groups."""

from __future__ import annotations

import torch

from fsdp.adamw import AdamW, param_groups
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
