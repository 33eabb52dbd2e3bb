"""AdamW, written out, working on each rank's local shards.

For every parameter p with gradient g, at step t (Loshchilov & Hutter, "Decoupled Weight Decay
Regularization", Algorithm 2, in the form torch.optim.AdamW computes):

    p  <- p * (1 - lr * weight_decay)                 decoupled weight decay
    m  <- beta1 * m + (1 - beta1) * g                 first moment
    v  <- beta2 * v + (1 - beta2) * g^2               second moment
    p  <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

m and v have the parameter's dtype and sharding: under FSDP they are DTensors holding this
rank's rows only, so optimizer state costs 8 bytes/param / world size in fp32, and DCP saves and
reshards them like any optimizer's. The arithmetic runs on the local tensors, one parameter at
a time: the only temporary is the denominator, the size of one parameter's shard (a `foreach`
implementation would allocate temporaries for all parameters at once).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fsdp.fake import host_float


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class AdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        if lr <= 0:
            raise ValueError(f"lr={lr}: must be > 0")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            # Same layout as torch.optim.AdamW's state, so tools that read one read the other.
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

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
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                t = host_float(state["step"], placeholder=1.0)
                param, grad = _local(p), _local(p.grad)
                m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])

                param.mul_(1 - lr * wd)
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1**t
                bias_correction2_sqrt = math.sqrt(1 - beta2**t)
                denom = v.sqrt().div_(bias_correction2_sqrt).add_(eps)  # the one temporary
                param.addcdiv_(m, denom, value=-lr / bias_correction1)
                del denom  # else it lives on while the next parameter's is made: two temporaries
        return loss


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
