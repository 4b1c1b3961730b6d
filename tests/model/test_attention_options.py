"""Attention-side kernels and the masks they read, on CPU (the same calls run on GPU):

- `--attention-backend sdpa-cudnn`: SDPA with cuDNN first in its backend order gives SDPAttention's numbers
  (on CPU cuDNN is skipped, so the call is the default one);
- SDPAttention's [b, np, sq, hn] -> [sq, b, np * hn] output is a view of SDPA's output (no copy);
- `--reset-attention-mask` with doubled CoCoMix layers: the [b, 1, 2s, 2s] mask, and SDPA's inverted form, are
  built once per forward and shared by every doubled layer;
- `--torch-compile-layers`: every layer but the concept-mixing one compiled in place, lazily; the compiled model
  (AOT autograd, eager kernels: inductor's code generation is a GPU measurement) gives the eager model's numbers.
"""

from __future__ import annotations

import pytest
import torch

from megatron_cocomix.model import attention, concept_mixing
from tests.helpers.launch import TINY_GPT


def build(flags, seed=0):
    from megatron.core.utils import get_model_config

    import pretrain_cocomix
    from megatron_cocomix.arguments import parse_args
    from megatron_cocomix.data.tokenizer import build_tokenizer
    from megatron_cocomix.distributed import initialize_distributed
    from megatron_cocomix.global_vars import set_args, set_tokenizer
    from megatron_cocomix.model.gpt import initialize_weights

    args = parse_args(TINY_GPT + list(flags))
    set_tokenizer(build_tokenizer(args))
    set_args(args)
    initialize_distributed(args)
    model = pretrain_cocomix.model_provider(pre_process=True, post_process=True)
    initialize_weights([model], seed, get_model_config(model), tied_embeddings=True)
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 255, (2, 32), generator=g)
    return tokens, torch.arange(32).unsqueeze(0).expand(2, -1)


def document_mask(boundaries=(0, 11, 20), s=32, b=2):
    """Megatron mask (True = masked) [b, 1, s, s]: causal within documents."""
    doc = torch.zeros(s, dtype=torch.long)
    for start in boundaries[1:]:
        doc[start:] += 1
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    return (~allowed).expand(b, 1, s, s).contiguous()


def loss_and_grads(model, mask=None):
    tokens, positions = batch()
    model.zero_grad(set_to_none=True)
    losses = model(tokens, positions, mask, labels=tokens)
    losses.float().sum().backward()
    return losses.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("extra", [(), ("--reset-attention-mask", "--pause-tokens", "--concept-layer", "1")])
def test_sdpa_cudnn_equals_sdpa(single_process, monkeypatch, extra):
    entered = []
    real = attention.sdpa_kernel
    monkeypatch.setattr(attention, "sdpa_kernel", lambda *a, **k: entered.append((a, k)) or real(*a, **k))
    mask = document_mask() if extra else None
    plain = loss_and_grads(build(list(extra)), mask)
    assert not entered
    cudnn = loss_and_grads(build(list(extra) + ["--attention-backend", "sdpa-cudnn"]), mask)
    assert len(entered) == 4  # once per layer
    (backends,), options = entered[0]
    assert backends[0] == torch.nn.attention.SDPBackend.CUDNN_ATTENTION and options == {"set_priority": True}
    assert_same(cudnn, plain, atol=0)


def test_output_layout_is_a_view(single_process, monkeypatch):
    """The context SDPA returns is reshaped to [sq, b, np * hn] without a copy (SDPA's kernels lay their output
    out in the query's memory order, and the query is a view of megatron's [s, b, ...] projection)."""
    outputs, results = [], []
    real = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **k: outputs.append(real(*a, **k)) or outputs[-1])
    model = build([])
    for layer in model.decoder.layers:
        layer.self_attention.core_attention.register_forward_hook(lambda m, i, o: results.append(o))
    with torch.no_grad():
        model(*batch(), None)
    assert len(outputs) == len(results) == 4
    for context, result in zip(outputs, results):
        assert result.untyped_storage().data_ptr() == context.untyped_storage().data_ptr(), "the output was copied"


def test_doubled_mask_built_once_per_forward(single_process, monkeypatch):
    built, seen = [], []
    real = concept_mixing.mask_for_slots
    monkeypatch.setattr(concept_mixing, "mask_for_slots", lambda m: built.append(1) or real(m))
    model = build(["--reset-attention-mask", "--pause-tokens", "--concept-layer", "1"])  # layers 1-3 doubled
    for layer in model.decoder.layers[1:]:
        layer.self_attention.core_attention.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    mask = document_mask()
    with torch.no_grad():
        model(*batch(), mask)
    assert len(built) == 1 and len(seen) == 3
    assert all(m is seen[0] for m in seen) and seen[0].shape == (2, 1, 64, 64)
    assert torch.equal(seen[0], real(mask))
    with torch.no_grad():
        model(*batch(), document_mask())  # a new batch, a new mask: built again
    assert len(built) == 2


def test_torch_compile_layers_wiring(single_process):
    from megatron.core.transformer.transformer_layer import TransformerLayer

    model = build(["--torch-compile-layers", "--cocomix", "--concept-layer", "2", "--concept-labels", "online",
                   "--teacher-model", ".", "--teacher-layer", "1", "--sae", ".", "--concept-dim", "64"])
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    compiled = [m._compiled_call_impl is not None for m in layers]
    assert compiled == [True, True, False, True]  # the concept-mixing layer (index 2) stays eager
    assert not any(getattr(m, "_compiled_call_impl", None) for m in build([]).modules())


@pytest.mark.slow
def test_compiled_layers_equal_eager(single_process, monkeypatch):
    """--torch-compile-layers through dynamo and AOT autograd (eager kernels) == the eager model: loss and grads."""
    from megatron_cocomix.model import gpt

    torch._dynamo.reset()
    monkeypatch.setattr(gpt, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    eager = loss_and_grads(build([]))
    compiled = loss_and_grads(build(["--torch-compile-layers"]))
    assert_same(compiled, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"])
def test_cuda_kernels_output_layout(backend):
    """Which CUDA SDPA kernels return the context in the query's memory order (so SDPAttention's final
    permute + reshape copies nothing): asserted for flash and cuDNN, reported for the memory-efficient kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s, b, heads, dim = 256, 2, 8, 64
    x = torch.randn(s, b, heads, dim, device="cuda", dtype=torch.bfloat16)
    q = x.permute(1, 2, 0, 3)  # SDPAttention's [s, b, np, hn] -> [b, np, s, hn] view
    with sdpa_kernel(getattr(SDPBackend, backend)):
        try:
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        except RuntimeError as e:
            pytest.skip(f"{backend} unavailable here: {e}")
    view = out.permute(2, 0, 1, 3).is_contiguous()
    print(backend, "output strides", out.stride(), "final reshape is a view:", view)
    if backend != "EFFICIENT_ATTENTION":
        assert view


@pytest.mark.gpu
def test_sdpa_cudnn_on_cuda(single_process):
    """sdpa-cudnn on CUDA: cuDNN's kernel runs (profiler) and the bf16 forward matches flash's."""
    from torch.profiler import ProfilerActivity, profile

    s, b, heads, dim = 256, 2, 8, 64
    q, k, v = (torch.randn(b, heads, s, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flash = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with attention.sdpa_kernel(attention.CUDNN_FIRST, set_priority=True):
            cudnn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
    names = " ".join(e.name.lower() for e in prof.events())
    if "cudnn" not in names:
        pytest.skip("cuDNN attention did not run for this shape on this card (SDPA fell back)")
    torch.testing.assert_close(cudnn, flash, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_compiled_layers_on_cuda(single_process):
    """--torch-compile-layers with inductor on CUDA (fp32, TF32 off): loss and grads equal the eager model's."""
    torch._dynamo.reset()
    tokens, positions = (t.cuda() for t in batch())

    def run(flags):
        model = build(flags).cuda()
        losses = model(tokens, positions, None, labels=tokens)
        losses.float().sum().backward()
        return losses.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert_same(run(["--torch-compile-layers"]), run([]), atol=1e-4)
