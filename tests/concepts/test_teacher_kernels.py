"""The teacher's faster kernels against the paths they replace, on CPU (the same code runs on GPU):

- GPT-2's `gelu_new` swapped for torch's fused tanh GELU at load (`load_teacher(fused_activations=True)`);
- the chunked linear cross-entropy over a padded vocabulary (`--teacher-lm-head chunked`, teacher_head.py)
  instead of the model's [b, t, V] logits;
- the KD baseline's teacher log-probabilities (the model's own head, fused GELU).

A GPT-2 with an odd vocabulary (1001 -> padded to 1024) and MLP weights scaled up so that GELU sees inputs of order
one (where its exact and tanh forms differ), and a Llama-shaped one (SiLU: nothing to swap)."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_cocomix.concepts import attribution_labels, load_sae, load_teacher, teacher_head
from megatron_cocomix.concepts.teacher_head import ChunkedLMHead, supports_chunked_head
from tests.helpers.allocations import LargeAllocations
from tests.helpers.concept_files import save_tiny_llama, write_openai_sae

VOCAB, D, C, K, LAYER = 1001, 64, 256, 16, 2
B, T = 3, 24


def save_gpt2(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=D, n_layer=4, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mlp.c_fc.weight" in name:
                param.mul_(25.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_kernels")
    write_openai_sae(str(root / "sae.pt"), D, C, K, seed=1)
    write_openai_sae(str(root / "sae_llama.pt"), 32, 128, 8, seed=2)
    return {"gpt2": save_gpt2(str(root / "gpt2")), "llama": save_tiny_llama(str(root / "llama")),
            "sae": str(root / "sae.pt"), "sae_llama": str(root / "sae_llama.pt")}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 7 tokens at V = 1024 (padded), so a batch spans several chunks and a partial last one."""
    monkeypatch.setattr(teacher_head, "CHUNK_ELEMENTS", 7 * 1024)


def tokens(vocab=VOCAB, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def outputs(teacher, sae, batch):
    hidden, grad, loss = teacher.hidden_and_grad(batch)
    return {"logits": teacher.logits(batch), "hidden": hidden, "grad": grad, "loss": loss,
            "sequence_losses": teacher.sequence_losses(batch),
            "spliced_losses": teacher.sequence_losses(batch, replace=sae),
            **{f"labels_{mode}": attribution_labels(teacher, sae, batch, mode=mode) for mode in ("act", "preact")}}


def assert_same_outputs(got, expected, grad_rtol=1e-5):
    for name in ("logits", "hidden", "loss", "sequence_losses", "spliced_losses"):
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    scale = expected["grad"].abs().max()
    torch.testing.assert_close(got["grad"], expected["grad"], rtol=0, atol=grad_rtol * scale)
    for mode in ("act", "preact"):
        name = f"labels_{mode}"
        assert torch.equal(got[name], expected[name]), name


def test_fused_gelu_equals_gelu_new(assets):
    from transformers.activations import GELUTanh, NewGELUActivation

    sae = load_sae(assets["sae"]).freeze()
    plain = load_teacher(assets["gpt2"], LAYER, lm_head="full", fused_activations=False)
    fused = load_teacher(assets["gpt2"], LAYER, lm_head="full")
    assert all(isinstance(block.mlp.act, NewGELUActivation) for block in plain.model.transformer.h)
    assert all(isinstance(block.mlp.act, GELUTanh) for block in fused.model.transformer.h)
    batch = tokens()
    assert_same_outputs(outputs(fused, sae, batch), outputs(plain, sae, batch))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_chunked_head_equals_full_head(assets, kind):
    sae = load_sae(assets["sae" if kind == "gpt2" else "sae_llama"]).freeze()
    full = load_teacher(assets[kind], LAYER, lm_head="full")
    chunked = load_teacher(assets[kind], LAYER)
    assert full.lm_head == "full" and chunked.lm_head == "chunked"
    padded = 1024 if kind == "gpt2" else 128  # GPT-2's 1001 and the Llama's 96 rows, padded to a multiple of 64
    assert chunked._head.weight.shape[0] == padded and chunked._head.chunk_tokens == 7 * 1024 // padded
    batch = tokens(chunked.vocab_size, seed=1)
    assert_same_outputs(outputs(chunked, sae, batch), outputs(full, sae, batch))


def test_chunked_head_bf16(assets):
    """A bf16 teacher: same loss and gradient up to bf16 rounding of the per-token gradient."""
    full = load_teacher(assets["gpt2"], LAYER, dtype="bf16", lm_head="full")
    chunked = load_teacher(assets["gpt2"], LAYER, dtype="bf16")
    batch = tokens(seed=2)
    _, grad_full, loss_full = full.hidden_and_grad(batch)
    _, grad, loss = chunked.hidden_and_grad(batch)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, loss_full, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.float(), grad_full.float(), rtol=0, atol=2e-2 * grad_full.abs().max().item())


def test_chunked_head_never_holds_all_logits(assets):
    """No fp32 tensor of [b * t, V] logits (the full head makes several: logits, upcast, softmax, gradient)."""
    full = load_teacher(assets["gpt2"], LAYER, lm_head="full")
    chunked = load_teacher(assets["gpt2"], LAYER)
    batch = tokens(seed=3)

    def large_ops(teacher):
        with LargeAllocations(B * T * VOCAB * 4) as mode:
            teacher.hidden_and_grad(batch)
        return mode.ops

    assert large_ops(chunked) == []
    assert len(large_ops(full)) >= 3


def test_chunked_head_unit():
    """ChunkedLMHead alone against F.cross_entropy on explicit logits: values and gradients, ignored targets."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(70, 16, generator=g)
    x = torch.randn(2, 9, 16, generator=g)
    targets = torch.randint(0, 70, (2, 9), generator=g)
    targets[:, -1] = teacher_head.IGNORE_INDEX
    targets[1, 3] = teacher_head.IGNORE_INDEX
    upstream = torch.rand(2, 9, generator=g)
    head = ChunkedLMHead(weight, chunk_elements=4 * 128)  # 70 -> 128 rows, 4 tokens per chunk
    assert head.chunk_tokens == 4

    x_ref = x.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy((x_ref @ weight.T).flatten(0, 1), targets.flatten(), reduction="none",
                                            ignore_index=teacher_head.IGNORE_INDEX).view(2, 9)
    (ref * upstream).sum().backward()
    x_new = x.clone().requires_grad_(True)
    ce = head.token_losses(x_new, targets)
    (ce * upstream).sum().backward()
    torch.testing.assert_close(ce, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_new.grad, x_ref.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(head.token_losses(x, targets), ref.detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="frozen"):
        ChunkedLMHead(weight.clone().requires_grad_(True))


def test_unsupported_architecture_keeps_the_full_head(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    GPTNeoXForCausalLM(config).save_pretrained(str(tmp_path / "neox"))
    teacher = load_teacher(str(tmp_path / "neox"), LAYER)
    assert not supports_chunked_head(teacher.model) and teacher.lm_head == "full"
    with pytest.raises(ValueError, match="--teacher-lm-head sparse"):
        load_teacher(str(tmp_path / "neox"), LAYER, lm_head="sparse")


def test_kd_log_probs(assets):
    """KD's teacher log-probabilities (OnlineTeacher.log_probs) equal log_softmax of the original model's logits
    (gelu_new, the model's own head)."""
    from megatron.core import parallel_state

    from megatron_cocomix.concepts.labeling import OnlineTeacher

    args = argparse.Namespace(teacher_model=assets["gpt2"], teacher_layer=LAYER, teacher_dtype="fp32",
                              teacher_lm_head="chunked", sae=assets["sae"])
    online = OnlineTeacher(args, device=torch.device("cpu"))
    plain = load_teacher(assets["gpt2"], LAYER, lm_head="full", fused_activations=False)
    batch = tokens(seed=5)
    parallel_state.set_tensor_model_parallel_world_size(1)
    try:
        log_probs = online.log_probs(batch)
    finally:
        parallel_state.set_tensor_model_parallel_world_size(None)
    expected = torch.log_softmax(plain.logits(batch).float(), dim=-1)
    assert log_probs.shape == (B, T, VOCAB) and log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs, expected, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_chunked_head_on_cuda(assets, dtype):
    """On CUDA (TF32 off): the chunked head's loss, gradient and labels against the model's own head."""
    sae = load_sae(assets["sae"], device="cuda", dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).freeze()
    full = load_teacher(assets["gpt2"], LAYER, dtype=dtype, device="cuda", lm_head="full")
    chunked = load_teacher(assets["gpt2"], LAYER, dtype=dtype, device="cuda")
    batch = tokens(seed=6).cuda()
    _, grad_full, loss_full = full.hidden_and_grad(batch)
    _, grad, loss = chunked.hidden_and_grad(batch)
    scale = grad_full.abs().max().item()
    if dtype == "fp32":
        torch.testing.assert_close(loss, loss_full, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, grad_full, rtol=0, atol=1e-5 * scale)
        assert torch.equal(attribution_labels(chunked, sae, batch), attribution_labels(full, sae, batch))
    else:
        torch.testing.assert_close(loss, loss_full, rtol=1e-3, atol=0)
        torch.testing.assert_close(grad.float(), grad_full.float(), rtol=0, atol=2e-2 * scale)
