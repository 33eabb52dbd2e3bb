"""Token-weighted cross-entropy, with the vocabulary logits made one slice of tokens at a time.

The loss of an optimizer step is  sum over every target token of -log p(token)  divided by the
count of target tokens in the *whole* step: all micro-batches, all ranks. Each micro-batch
returns its *sum*; the training step divides by the global count (the loader's, known before the first
forward). That is what makes k micro-batches of b sequences equal one batch of k*b, and N ranks
equal one process: a per-micro-batch mean would weight a short micro-batch's tokens more.

The logits are the wild card of memory: micro-batch x sequence x vocabulary, upcast to fp32 for
a stable softmax (2 x 2048 x 128256 x 4 bytes = 2 GiB for Llama 3). We never hold them whole:
each slice of `chunk_tokens` tokens is projected, reduced to its loss sum and dropped, and
recomputed in backward (activation checkpointing of the slice), so one slice of fp32 logits is
alive at a time. A micro-batch that fits in one slice is not recomputed: its logits are the last
thing the forward makes and the first the backward frees, so keeping them costs no more than
making them again, and the output-head matmul (a fifth of SmolLM2's FLOPs) runs once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from batch import IGNORE_INDEX


def _slice_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, output_weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 1024
) -> torch.Tensor:
    """Sum of token cross-entropies. `labels[b, t]` is the target of position t (already shifted), -100 for none.

    hidden: (batch, seq, hidden) final hidden states; output_weight: (vocab, hidden) output projection.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    several = labels.numel() > chunk_tokens
    for start in range(0, labels.numel(), chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], labels[start : start + chunk_tokens]
        if torch.is_grad_enabled() and several:
            total = total + checkpoint(_slice_loss_sum, h, output_weight, y, use_reentrant=False)
        else:
            total = total + _slice_loss_sum(h, output_weight, y)
    return total
