"""The concept cross-entropy (model/losses.py) at TP1 in one process: the same numbers as the formula it replaced
(lse and target logits each computed on an fp32 copy of the logits, through autograd), and one fp32 buffer of the
logits' shape in forward and backward together instead of several.

The tensor-parallel cases (TP2, against megatron's vocab_parallel_cross_entropy) run in
tests/model/test_concept_ops.py."""

from __future__ import annotations

import pytest
import torch

from megatron_cocomix.model.losses import concept_cross_entropy
from tests.helpers.allocations import LargeAllocations

S, B, C, K = 6, 3, 512, 4


@pytest.fixture(autouse=True)
def tp1():
    """megatron's TP rank / size getters answer 1 and 0 without process groups."""
    from megatron.core import parallel_state

    parallel_state.set_tensor_model_parallel_world_size(1)
    parallel_state.set_tensor_model_parallel_rank(0)
    yield
    parallel_state.set_tensor_model_parallel_world_size(None)
    parallel_state.set_tensor_model_parallel_rank(None)


def previous_concept_cross_entropy(local_logits, labels):
    """The formula as it was: an fp32 copy for the log-sum-exp, another for the target gather."""
    logits = local_logits.float()
    global_max = logits.max(dim=-1, keepdim=True).values.detach()
    lse = torch.log(torch.exp(logits - global_max).sum(dim=-1, keepdim=True)) + global_max
    owned = labels >= 0
    picked = torch.gather(local_logits.float(), -1, torch.where(owned, labels, torch.zeros_like(labels)))
    valid = labels >= 0
    return ((lse - picked * owned) * valid).sum(), valid.sum()


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(S, B, C, generator=g) * 4).to(dtype)
    labels = torch.randint(0, C, (S, B, K), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.25] = -1
    labels[0, 0] = torch.tensor([5, 5, -1, 7])  # a repeated target: gradients of both add up
    return logits, labels, torch.rand((), generator=g) + 0.5


def value_and_grad(fn, logits, labels, upstream):
    z = logits.clone().requires_grad_(True)
    ce_sum, count = fn(z, labels)
    (ce_sum * upstream).backward()
    return ce_sum.detach(), int(count), z.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_previous_formula(dtype):
    logits, labels, upstream = inputs(dtype)
    new_value, new_count, new_grad = value_and_grad(concept_cross_entropy, logits, labels, upstream)
    old_value, old_count, old_grad = value_and_grad(previous_concept_cross_entropy, logits, labels, upstream)
    assert new_count == old_count == int((labels >= 0).sum())
    assert new_value.dtype == torch.float32 and new_grad.dtype == dtype
    torch.testing.assert_close(new_value, old_value, rtol=1e-6, atol=1e-5)
    # bf16: both round the same fp32 gradient to bf16 (so at most one bf16 step apart).
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-7)
    torch.testing.assert_close(new_grad, old_grad, **tol)
    # Against log_softmax (an independent reference).
    dense = -(torch.gather(logits.float().log_softmax(-1), -1, labels.clamp(min=0)) * (labels >= 0)).sum()
    torch.testing.assert_close(new_value, dense, rtol=1e-6, atol=1e-5)


def test_logits_left_untouched():
    """Top-k reads the same logits after the loss: the in-place work happens on a copy (also for fp32)."""
    logits, labels, _ = inputs(torch.float32)
    z = logits.clone().requires_grad_(True)
    ce_sum, _ = concept_cross_entropy(z, labels)
    ce_sum.backward()
    assert torch.equal(z.detach(), logits)


def fp32_copies(fn, dtype):
    logits, labels, upstream = inputs(dtype)
    z = logits.clone().requires_grad_(True)
    # Inputs are made outside the mode; everything [S x B x C] in fp32 inside it is a copy made by the loss.
    with LargeAllocations(S * B * C * 4) as mode:
        ce_sum, _ = fn(z, labels)
        (ce_sum * upstream).backward()
    return mode.ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_fp32_buffer_of_the_logits_shape(dtype):
    ops = fp32_copies(concept_cross_entropy, dtype)
    assert len(ops) == 1, f"fp32 [tokens x C] allocations in forward + backward: {ops}"
    # The counter sees the copies of the formula this replaced.
    previous = fp32_copies(previous_concept_cross_entropy, dtype)
    assert len(previous) >= 4, previous


@pytest.mark.gpu
def test_peak_memory_on_cuda():
    """At a CoCoMix-sized [8 x 1024, 32768] bf16 logits tensor: the loss's forward + backward peak above the
    logits themselves is one fp32 copy plus the bf16 gradient, at least 1.5x below the formula it replaced."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(1024, 8, 32768, device="cuda", generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 32768, (1024, 8, 4), device="cuda", generator=g)
    peaks = {}
    for name, fn in (("new", concept_cross_entropy), ("previous", previous_concept_cross_entropy)):
        z = logits.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ce_sum, _ = fn(z, labels)
        ce_sum.backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        del z, ce_sum
    fp32_copy = logits.numel() * 4
    print({k: v / 2 ** 20 for k, v in peaks.items()}, "MiB")
    assert peaks["new"] <= 1.6 * fp32_copy and peaks["previous"] >= 1.5 * peaks["new"], peaks
