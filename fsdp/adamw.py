"""AdamW, written out, working on each rank's local shards.

For every parameter p with gradient g, at step t (Loshchilov & Hutter, "Decoupled Weight Decay
Regularization", Algorithm 2, in the form torch.optim.AdamW computes):

    p  <- p * (1 - lr * weight_decay)                 decoupled weight decay
    m  <- beta1 * m + (1 - beta1) * g                 first moment
    v  <- beta2 * v + (1 - beta2) * g^2               second moment
    p  <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

m and v have the parameter's sharding: under FSDP they are DTensors holding this rank's rows only,
so optimizer state costs 8 bytes/param / world size in fp32, and DCP saves and reshards them like
any optimizer's. Their dtype is the parameter's unless `state_dtype` (optim.state_dtype) says
bf16: 4 bytes/param less beside fp32 parameters. The update is still computed in the parameter's
dtype, the moments upcast for it and stored back rounded (`AdamW._step_group` says why); the
upcast copies double the loop's and foreach's temporaries below, and fused refuses it.

Three implementations of that arithmetic (`make_adamw`, `optim.impl`), one state layout
(torch.optim.AdamW's "step", "exp_avg", "exp_avg_sq", so checkpoints move between them):
  loop     `AdamW`: one parameter at a time, on the local shards. The reference: every line is
           a line of the algorithm. Temporaries: one denominator, the largest parameter's shard.
  foreach  `ForeachAdamW`: the same operations, each applied to all of a group's shards in one
           torch._foreach_* call (one kernel launch per operation and group rather than per
           parameter: what matters on a GPU). Temporaries: the denominators of a whole group at
           once, the sum of its shards (the decay group: almost every parameter). On CPU it is
           slower than the loop: ATen's CPU foreach ops loop over the tensors anyway, and the
           group's denominators are fresh pages to fault in at every step.
  fused    `FusedAdamW`: torch.optim.AdamW(fused=True)'s kernel (CPU and CUDA), one call per
           group that reads and writes each element once and allocates no temporaries. Not our
           arithmetic line by line, so not the reference: it agrees with the loop to rounding.
The loop stays the reference because it is the one whose every line can be read against the
algorithm above; the other two are tested against it (tests/test_adamw.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fsdp.fake import host_float
from fsdp.precision import DTYPES


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class AdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        state_dtype: torch.dtype | None = None,
    ):
        if lr <= 0:
            raise ValueError(f"lr={lr}: must be > 0")
        # Not a param_groups key: DCP checkpoints keep the groups' keys, and one saved with either
        # state dtype must load into the other (the state is cast on load, see load_state_dict).
        self.state_dtype = state_dtype  # m and v's dtype; None: each parameter's own
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        # Refused now, not at step 1: moments wider than a parameter, and betas whose steps a
        # narrower state rounds away (see _step_group).
        params = [p for group in self.param_groups for p in group["params"]]
        narrower = {self.moment_dtype(p) for p in params if self.moment_dtype(p) != p.dtype}
        for dtype in narrower:
            smallest = torch.finfo(dtype).eps / 2  # half an ulp, relative: 2^-8 for bf16
            for name, beta in zip(("beta1", "beta2"), betas, strict=True):
                if 1 - beta < smallest:
                    raise ValueError(
                        f"optim.state_dtype={_name(dtype)}: optim.betas {name}={beta} moves m or v by "
                        f"{1 - beta:.2g} of the way per step, which {_name(dtype)} rounds away (below "
                        f"{smallest:.2g}); use betas <= {1 - smallest:.6g} or state_dtype null"
                    )

    def moment_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of p's m and v: the state dtype, never wider than p's (the update runs in p's dtype,
        so fp32 moments beside bf16 weights would be rounded to bf16 at every step anyway)."""
        dtype = self.state_dtype or p.dtype
        if dtype.itemsize > p.dtype.itemsize:
            raise ValueError(
                f"optim.state_dtype={_name(dtype)}: wider than the {_name(p.dtype)} parameters it would "
                "update (AdamW computes in the parameters' dtype); use null, their own"
            )
        return dtype

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            # Same layout as torch.optim.AdamW's state, so tools that read one read the other.
            dtype = self.moment_dtype(p)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load, then m and v in this optimizer's state dtype: torch.optim casts every
        floating state tensor to its parameter's dtype (fp32 under mixed), which would silently undo
        optim.state_dtype=bf16. So a checkpoint saved with either state dtype resumes with the other
        (bf16 to fp32 exactly; fp32 to bf16 rounded, as every step rounds them)."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype(p))

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate m and v of every parameter now rather than at the first step (memory estimates)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state(p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        """The update of one group, one parameter at a time (the subclasses do a group at once).

        Moments kept narrower than their parameter (optim.state_dtype=bf16 beside fp32 weights) are
        upcast for the update and stored back rounded: the arithmetic is the fp32 update's, the
        weights stay fp32 so every small update lands, and the only rounding is in storing m and v.
        Not the trap of m and v inheriting bf16 with the weights under FSDP and updated in bf16,
        reported to stall training. What storing them still costs: a change below half a bf16 ulp
        (2^-9 to 2^-8 of the value) rounds away, so each step must move them by more than that,
        1 - beta >= 2^-8 (`AdamW` refuses betas above 1 - 2^-8 with a narrower state: at 0.999 a
        bf16 v never decays at all, and the step sizes after a gradient spike stay small for good).
        """
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in params:
            state = self._state(p)
            state["step"] += 1
            t = host_float(state["step"], placeholder=1.0)
            param, grad = _local(p), _local(p.grad)
            m_kept, v_kept = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
            # The same tensors when the dtypes agree (.to returns self); else fp32 copies, the step's
            # temporaries: two of the shard where the fp32 state's step holds one (its denominator).
            m, v = m_kept.to(param.dtype), v_kept.to(param.dtype)

            param.mul_(1 - lr * wd)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**t
            bias_correction2_sqrt = math.sqrt(1 - beta2**t)
            if v is v_kept:
                denom = v.sqrt()  # the one temporary
            else:
                m_kept.copy_(m)
                v_kept.copy_(v)
                denom = v.sqrt_()  # the upcast v, stored already, is the denominator: no third copy
            denom.div_(bias_correction2_sqrt).add_(eps)
            param.addcdiv_(m, denom, value=-lr / bias_correction1)
            del denom, m, v  # else they live on while the next parameter's are made


class ForeachAdamW(AdamW):
    """`AdamW`'s arithmetic, operation by operation, each over all of a group's local shards at once.

    Same state, same `init_state`, same results: on CPU the foreach ops run the loop's per-tensor
    kernels (bit-identical); on CUDA their multi-tensor kernels may differ in the last bit.
    """

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = [self._state(p) for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        # Per parameter, as in the loop: a parameter without a gradient at some step lags behind.
        ts = [host_float(t, placeholder=1.0) for t in steps]
        ps, grads = [_local(p) for p in params], [_local(p.grad) for p in params]
        kept_ms = [_local(s["exp_avg"]) for s in states]
        kept_vs = [_local(s["exp_avg_sq"]) for s in states]
        # As in the loop: moments kept narrower than their parameter are updated in its dtype, as
        # copies (the whole group's at once), and stored back rounded.
        ms = [m.to(p.dtype) for m, p in zip(kept_ms, ps, strict=True)]
        vs = [v.to(p.dtype) for v, p in zip(kept_vs, ps, strict=True)]
        upcast = [i for i, (m, kept) in enumerate(zip(ms, kept_ms, strict=True)) if m is not kept]

        if wd != 0:  # the loop multiplies by 1.0 here, exactly; a pass over the group saved
            torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        if upcast:
            torch._foreach_copy_([kept_ms[i] for i in upcast], [ms[i] for i in upcast])
            torch._foreach_copy_([kept_vs[i] for i in upcast], [vs[i] for i in upcast])
        # The price of one call per operation: every shard's denominator of the group is alive at
        # once (the loop holds one), until this function returns; upcast, the copies of v are.
        if len(upcast) == len(vs):
            torch._foreach_sqrt_(vs)
            denoms = vs
        else:
            denoms = torch._foreach_sqrt(vs)
        torch._foreach_div_(denoms, [math.sqrt(1 - beta2**t) for t in ts])
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(ps, ms, denoms, [-lr / (1 - beta1**t) for t in ts])


class FusedAdamW(AdamW):
    """The update by torch.optim.AdamW(fused=True)'s kernel (torch._fused_adamw_), on the local shards.

    Not torch.optim.AdamW itself, though that runs on FSDP2's DTensors too: its param_groups carry
    seven more keys (amsgrad, fused, ...), so DCP refuses to load a loop or foreach checkpoint
    into it ("Missing key in checkpoint state_dict: optim.param_groups.0.amsgrad"). This class
    keeps our groups and state, and checkpoints move freely between the three.

    The kernel reads m and v in the parameters' dtype (CPU: "expected scalar type Float but found
    BFloat16"; CUDA's checks that every list has one dtype), so bf16 moments beside fp32 parameters
    are refused here rather than upcast: copies of the whole group's m and v would cost more at the
    step than the bytes the bf16 state saves.
    """

    def __init__(self, params: Iterable, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            for p in group["params"]:
                if self.moment_dtype(p) != p.dtype:
                    raise ValueError(
                        f"optim.impl=fused: torch's fused AdamW needs m and v in the parameters' dtype "
                        f"({_name(p.dtype)}), not optim.state_dtype={_name(self.moment_dtype(p))}; use "
                        "optim.impl=loop or foreach"
                    )

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            super()._state(p)
            # The kernel reads the step counter where it runs: on the parameter's device, as
            # torch.optim.AdamW(fused=True) keeps it (a no-op on CPU).
            state["step"] = state["step"].to(_local(p).device)
        return state

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        states = [self._state(p) for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(
            [_local(p) for p in params],
            [_local(p.grad) for p in params],
            [_local(s["exp_avg"]) for s in states],
            [_local(s["exp_avg_sq"]) for s in states],
            [],  # max_exp_avg_sqs: amsgrad only
            steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
        )


IMPLS = ("loop", "foreach", "fused")


def make_adamw(
    groups: Iterable,
    impl: str = "loop",
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    state_dtype: str | None = None,
) -> torch.optim.Optimizer:
    """AdamW by `impl` (IMPLS: loop, foreach, fused); weight decay comes from each group (`param_groups`);
    m and v in `state_dtype` (optim.state_dtype: bf16 | fp32; None: each parameter's dtype).

    All three keep the same param_groups and state, so a checkpoint of one resumes in another.
    """
    classes = {"loop": AdamW, "foreach": ForeachAdamW, "fused": FusedAdamW}
    if impl not in classes:
        raise ValueError(f"optim.impl={impl!r}: expected one of {', '.join(IMPLS)}")
    if state_dtype is not None and state_dtype not in DTYPES:
        raise ValueError(f"optim.state_dtype={state_dtype!r}: expected null or one of {', '.join(DTYPES)}")
    dtype = DTYPES[state_dtype] if state_dtype else None
    return classes[impl](groups, lr=lr, betas=betas, eps=eps, state_dtype=dtype)


@torch.no_grad()
def init_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate m and v of every parameter now rather than at the first step, for any `make_adamw` impl.

    So that every step, the first included, holds them (memory is steady from step 1, and a memory
    estimate sees them). A torch.optim.Adam(W) is given the entries its own first step would make:
    with fused (or capturable) a float32 step on the parameter's device, else on the host.
    """
    if isinstance(optimizer, AdamW):
        optimizer.init_state()
        return
    if not isinstance(optimizer, torch.optim.Adam):
        raise TypeError(f"init_state: {type(optimizer).__name__} is not an AdamW of make_adamw")
    for group in optimizer.param_groups:
        on_device = bool(group["fused"] or group["capturable"])
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            if group["fused"] and not p.is_floating_point():
                raise ValueError(f"fused AdamW needs floating-point parameters, got {p.dtype}")
            step_dtype = torch.float32 if group["fused"] else _host_step_dtype()
            state["step"] = torch.zeros((), dtype=step_dtype, device=p.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _name(dtype: torch.dtype) -> str:
    """A dtype by the name configs use (bf16, fp32), else torch's."""
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def _host_step_dtype() -> torch.dtype:
    # torch.optim's rule for a non-fused step counter (optimizer._get_scalar_dtype).
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def param_groups(
    model: nn.Module, weight_decay: float, decay_embeddings: bool = False
) -> list[dict[str, object]]:
    """Two groups: matrices decay; norms, biases (any parameter under 2-D) and, unless asked, embeddings do not."""
    embedding_params = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is not None
    }
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        is_embedding = id(p) in embedding_params
        if p.ndim < 2 or (is_embedding and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
