"""The learning-rate schedule, the batch geometry, and the chunked token-weighted loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from batch import BatchGeometry
from fsdp.loss import chunked_cross_entropy_sum
from fsdp.schedule import LRSchedule, warmup_steps

pytestmark = pytest.mark.fast  # every test here runs in this process: the fast tier (make test-fast)


def test_warmup_then_cosine_to_the_floor():
    s = LRSchedule(peak_lr=1e-4, total_steps=11, warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
    assert [s(0), s(1)] == pytest.approx([5e-5, 1e-4])
    assert s(2) == pytest.approx(1e-4)  # decay starts at the peak
    assert s(10) == pytest.approx(1e-5)  # and ends on the floor
    assert s(6) == pytest.approx(1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    lrs = [s(i) for i in range(2, 11)]
    assert lrs == sorted(lrs, reverse=True)


def test_linear_and_constant():
    linear = LRSchedule(1.0, total_steps=5, warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert [linear(i) for i in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    constant = LRSchedule(1.0, total_steps=5, warmup_steps=1, decay="constant")
    assert [constant(i) for i in range(5)] == [1.0] * 5
    assert warmup_steps(100, None, 0.03) == 3 and warmup_steps(100, 7, 0.03) == 7


def test_batch_geometry():
    g = BatchGeometry(micro_batch_size=2, grad_accum_steps=16, world_size=8, max_seq_length=2048)
    assert (g.per_rank_sequences, g.global_sequences, g.global_max_tokens) == (32, 256, 524_288)
    assert "2 seq/micro-batch x 16 accumulation x 8 ranks = 256 sequences" in g.describe()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_full_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = -100
    labels[2, 7:] = -100
    loss = chunked_cross_entropy_sum(hidden, weight, labels, chunk)
    grads = torch.autograd.grad(loss, (hidden, weight))
    reference = F.cross_entropy((hidden @ weight.t()).reshape(-1, 50), labels.reshape(-1), reduction="sum")
    ref_grads = torch.autograd.grad(reference, (hidden, weight))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
