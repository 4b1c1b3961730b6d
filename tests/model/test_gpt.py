"""The student GPT (model/gpt.py) against Hugging Face's GPT-2 (transformers, plain torch) with the same weights.

With --openai-gelu the megatron-core model computes GPT-2's own function (`gelu_new`, the tanh approximation);
without it (exact GELU) the logits part from GPT-2's by more than rounding. The weights are mapped here by hand
from megatron's layout (fused QKV [heads, (q, k, v), head_dim] along the output dim; y = x W^T) to GPT-2's
Conv1D layout (y = x W): an independent reading of both, not the project's code.
"""

import pytest
import torch

from tests.helpers.launch import TINY_GPT

HEADS, HIDDEN, LAYERS, SEQ, VOCAB = 4, 64, 4, 32, 256


def build_student(extra_flags):
    from megatron.core.utils import get_model_config

    import pretrain_cocomix
    from megatron_cocomix.arguments import parse_args
    from megatron_cocomix.data.tokenizer import build_tokenizer
    from megatron_cocomix.distributed import initialize_distributed
    from megatron_cocomix.global_vars import set_args, set_tokenizer
    from megatron_cocomix.model.gpt import initialize_weights

    args = parse_args(TINY_GPT + list(extra_flags))
    set_tokenizer(build_tokenizer(args))
    set_args(args)
    initialize_distributed(args)
    model = pretrain_cocomix.model_provider(pre_process=True, post_process=True)
    initialize_weights([model], args.seed, get_model_config(model), tied_embeddings=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # biases and norms non-trivial, so that a mis-mapped one shows
        for name, param in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn(param.shape, generator=g))
            elif name.endswith(("linear_fc1.weight", "linear_fc2.weight")):
                param.mul_(25.0)  # MLP activations of order 1, where the two GELUs differ, and felt downstream
    return model.eval()


def gpt2_with_weights_of(model):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    gpt2 = GPT2LMHeadModel(config).eval()
    m = {name: p.detach() for name, p in model.named_parameters()}
    hd = HIDDEN // HEADS
    out = {"transformer.wte.weight": m["embedding.word_embeddings.weight"],
           "transformer.wpe.weight": m["embedding.position_embeddings.weight"],
           "transformer.ln_f.weight": m["decoder.final_layernorm.weight"],
           "transformer.ln_f.bias": m["decoder.final_layernorm.bias"]}
    for i in range(LAYERS):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        qkv_w = m[src + "self_attention.linear_qkv.weight"].view(HEADS, 3, hd, HIDDEN)
        qkv_b = m[src + "self_attention.linear_qkv.bias"].view(HEADS, 3, hd)
        out[dst + "attn.c_attn.weight"] = torch.cat([qkv_w[:, j].reshape(HIDDEN, HIDDEN) for j in range(3)]).T
        out[dst + "attn.c_attn.bias"] = torch.cat([qkv_b[:, j].reshape(HIDDEN) for j in range(3)])
        out[dst + "attn.c_proj.weight"] = m[src + "self_attention.linear_proj.weight"].T
        out[dst + "attn.c_proj.bias"] = m[src + "self_attention.linear_proj.bias"]
        out[dst + "mlp.c_fc.weight"] = m[src + "mlp.linear_fc1.weight"].T
        out[dst + "mlp.c_fc.bias"] = m[src + "mlp.linear_fc1.bias"]
        out[dst + "mlp.c_proj.weight"] = m[src + "mlp.linear_fc2.weight"].T
        out[dst + "mlp.c_proj.bias"] = m[src + "mlp.linear_fc2.bias"]
        for ln_src, ln_dst in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out[dst + ln_dst + ".weight"] = m[src + ln_src + ".weight"]
            out[dst + ln_dst + ".bias"] = m[src + ln_src + ".bias"]
    missing, unexpected = gpt2.load_state_dict(out, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    gpt2.tie_weights()
    return gpt2


def logits_of_both(model, gpt2):
    tokens = torch.randint(0, 255, (2, SEQ), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        ours = model(tokens, positions, None)
        theirs = gpt2(input_ids=tokens).logits
    return ours, theirs


def test_openai_gelu_equals_gpt2_gelu_new(single_process):
    ours, theirs = logits_of_both(*(lambda m: (m, gpt2_with_weights_of(m)))(build_student(["--openai-gelu"])))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_exact_gelu_is_not_gelu_new(single_process):
    ours, theirs = logits_of_both(*(lambda m: (m, gpt2_with_weights_of(m)))(build_student([])))
    assert not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)  # the tolerance above would see it


@pytest.mark.parametrize("flag", ["--openai-gelu", None])
def test_activation_from_flags(flag):
    import torch.nn.functional as F

    from megatron_cocomix.arguments import parse_args
    from megatron_cocomix.model.gpt import activation_from_args, openai_gelu

    args = parse_args(TINY_GPT + ([flag] if flag else []))
    x = torch.linspace(-4, 4, 101)
    expected = F.gelu(x, approximate="tanh") if flag else F.gelu(x)
    torch.testing.assert_close(activation_from_args(args)(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(openai_gelu(x), 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))))
