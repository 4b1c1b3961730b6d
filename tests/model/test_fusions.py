"""megatron-core's fusions (model/fusions.py): which ones the config picks on CUDA (decided without a GPU, by
passing the device type), and that each picked fused function computes what the unfused path computes, on CPU.

megatron's fused functions are `jit_fuser` = torch.compile'd. The fast tests run their Python bodies eagerly
(dynamo disabled: the very code inductor traces), through megatron's own modules built from the CUDA config; the
slow test runs them compiled by inductor on CPU tensors (C++ codegen, a minute or two on a small machine)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from megatron_cocomix.arguments import ArgumentError, parse_args
from megatron_cocomix.model import fusions
from megatron_cocomix.model.fusions import fusion_settings
from megatron_cocomix.model.gpt import build_transformer_config, openai_gelu
from tests.helpers.launch import TINY_GPT

S, B, H = 8, 2, 64


def args_of(*flags):
    return parse_args(TINY_GPT + list(flags))


def picked(*flags, device="cuda"):
    return fusion_settings(args_of(*flags), device)


# ------------------------------------------------------------------------------------------- the decision
def test_nothing_fused_on_cpu():
    for flags in ((), ("--openai-gelu",), ("--swiglu",), ("--bf16", "--cross-entropy-loss-fusion")):
        settings = picked(*flags, device="cpu")
        assert not any(v for k, v in settings.items() if k != "cross_entropy_fusion_impl"), (flags, settings)
        assert "activation_func" not in settings


def test_cuda_picks_the_torch_fusions():
    default = picked()
    assert default["bias_dropout_fusion"] and not default["bias_activation_fusion"]  # exact GELU: not fused
    assert not default["cross_entropy_loss_fusion"]  # opt-in, as in Megatron-LM
    assert "activation_func" not in default
    gelu = picked("--openai-gelu")
    assert gelu["bias_activation_fusion"] and gelu["activation_func"] is F.gelu
    assert not picked("--openai-gelu", "--no-bias-gelu-fusion")["bias_activation_fusion"]
    assert not picked("--openai-gelu", "--disable-bias-linear")["bias_activation_fusion"]  # megatron adds a bias
    assert picked("--swiglu")["bias_activation_fusion"]
    assert picked("--swiglu", "--disable-bias-linear")["bias_activation_fusion"]
    assert not picked("--swiglu", "--no-bias-swiglu-fusion")["bias_activation_fusion"]
    assert not picked("--no-bias-dropout-fusion")["bias_dropout_fusion"]
    assert picked("--bf16", "--cross-entropy-loss-fusion")["cross_entropy_loss_fusion"]
    with pytest.raises(ArgumentError, match="--cross-entropy-loss-fusion needs --bf16"):
        args_of("--cross-entropy-loss-fusion")
    # Not here: TE's RoPE, and kernels that need apex / compiled extensions (absent on this machine).
    for name in ("apply_rope_fusion", "masked_softmax_fusion", "persist_layer_norm", "gradient_accumulation_fusion"):
        assert not picked("--attention-backend", "local")[name], name


def test_cuda_extension_fusions_follow_their_availability(monkeypatch):
    monkeypatch.setattr(fusions, "module_available", lambda name: True)
    local = picked("--attention-backend", "local")
    assert local["masked_softmax_fusion"] and local["persist_layer_norm"] and local["gradient_accumulation_fusion"]
    assert not picked()["masked_softmax_fusion"]  # SDPA has its own fused kernels
    assert not picked("--normalization", "RMSNorm")["persist_layer_norm"]
    assert not picked("--no-gradient-accumulation-fusion")["gradient_accumulation_fusion"]
    assert not picked("--no-masked-softmax-fusion", "--attention-backend", "local")["masked_softmax_fusion"]
    # DeepSpeed keeps no main_grad for the fused GEMM to accumulate into.
    settings = fusion_settings(args_of(), "cuda")
    args = args_of()
    args.deepspeed = True
    assert settings["gradient_accumulation_fusion"] and not fusion_settings(args, "cuda")["gradient_accumulation_fusion"]


def test_transformer_config_accepts_the_cuda_choice():
    """megatron's own config checks pass for what fusion_settings picks (e.g. F.gelu for the fused tanh GELU)."""
    config = build_transformer_config(args_of("--openai-gelu"), device_type="cuda")
    assert config.bias_activation_fusion and config.activation_func is F.gelu and config.bias_dropout_fusion
    config = build_transformer_config(args_of("--openai-gelu"), device_type="cpu")
    assert not config.bias_activation_fusion and config.activation_func is openai_gelu
    config = build_transformer_config(args_of("--swiglu", "--bf16", "--cross-entropy-loss-fusion"), device_type="cuda")
    assert config.bias_activation_fusion and config.cross_entropy_loss_fusion
    assert config.cross_entropy_fusion_impl == "native"


# ---------------------------------------------------------------------------- fused == unfused, on CPU
@pytest.fixture(scope="module")
def tp1(single_process):
    from megatron_cocomix.distributed import initialize_distributed

    initialize_distributed(args_of())


def mlp_from(config, seed=0):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    torch.manual_seed(seed)
    mlp = build_module(get_gpt_layer_local_spec().submodules.mlp, config=config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in mlp.parameters():  # fc1 outputs of order one, where GELU's tanh and erf forms differ
            param.copy_(torch.randn(param.shape, generator=g) * (0.25 if param.dim() > 1 else 1.0))
    return mlp


def mlp_output_and_grads(mlp, x):
    x = x.clone().requires_grad_(True)
    out, bias = mlp(x)
    out = out + bias if bias is not None else out
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device, out.dtype)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, {name: p.grad for name, p in mlp.named_parameters()}


def assert_same_mlp(flags, cuda_flags_changed=True):
    args = args_of(*flags)
    cuda = build_transformer_config(args, device_type="cuda")
    cpu = build_transformer_config(args, device_type="cpu")
    assert cuda.bias_activation_fusion == cuda_flags_changed and not cpu.bias_activation_fusion
    x = torch.randn(S, B, H, generator=torch.Generator().manual_seed(1))
    fused = mlp_output_and_grads(mlp_from(cuda), x)
    plain = mlp_output_and_grads(mlp_from(cpu), x)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-5)
    for name in plain[2]:
        torch.testing.assert_close(fused[2][name], plain[2][name], rtol=1e-5, atol=1e-5, msg=name)
    return (fused[0] - plain[0]).abs().max().item()


@pytest.mark.parametrize("flags", [("--openai-gelu",), ("--swiglu",), ("--swiglu", "--disable-bias-linear")])
def test_fused_mlp_equals_unfused(tp1, flags):
    """megatron's MLP built from the CUDA config (fused bias-activation, run eagerly here) == from the CPU one."""
    with torch._dynamo.config.patch(disable=True):
        assert_same_mlp(flags)


def test_fused_gelu_would_change_exact_gelu(tp1):
    """Why exact GELU is never fused: megatron's fused bias-GELU is the tanh form."""
    args = args_of()
    config = build_transformer_config(args, device_type="cpu")
    x = torch.randn(S, B, H, generator=torch.Generator().manual_seed(1))
    plain = mlp_output_and_grads(mlp_from(config), x)[0]
    config.bias_activation_fusion = True
    with torch._dynamo.config.patch(disable=True):
        fused = mlp_output_and_grads(mlp_from(config), x)[0]
    assert (fused - plain).abs().max() > 1e-4


def check_bias_dropout_add(device="cpu"):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    g = torch.Generator().manual_seed(2)
    x, bias, residual = (torch.randn(*shape, generator=g).to(device) for shape in ((S, B, H), (H,), (S, B, H)))
    for training, prob in ((True, 0.0), (False, 0.1)):
        fused = get_bias_dropout_add(training, True)((x.clone(), bias), residual, prob)
        plain = get_bias_dropout_add(training, False)((x.clone(), bias), residual, prob)
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
    # With dropout the mask comes from another random stream: check it is a dropout of (x + bias), kept / (1 - p).
    prob = 0.25
    fused = get_bias_dropout_add(True, True)((x.clone(), bias), residual, prob) - residual
    kept = fused.abs() > 0
    torch.testing.assert_close(fused[kept], ((x + bias) / (1 - prob))[kept], rtol=1e-5, atol=1e-6)
    assert abs(kept.float().mean().item() - (1 - prob)) < 0.05


def test_fused_bias_dropout_add_equals_unfused():
    with torch._dynamo.config.patch(disable=True):
        check_bias_dropout_add()


def check_native_cross_entropy(device="cpu"):
    """megatron's native fused vocab-parallel cross-entropy == its unfused one, for bf16 logits (the case
    fusion_settings allows): losses and the bf16 logit gradients."""
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(S, B, 384, generator=g) * 3).to(device, torch.bfloat16)
    logits[..., 300:] = torch.finfo(torch.bfloat16).min  # padded vocabulary rows, as mask_padded_vocab sets them
    target = torch.randint(0, 300, (S, B), generator=g).to(device)
    upstream = torch.rand(S, B, generator=g).to(device)
    fused_in = logits.clone().requires_grad_(True)
    fused = fused_vocab_parallel_cross_entropy(fused_in, target, parallel_state.get_tensor_model_parallel_group())
    (fused * upstream).sum().backward()
    plain_in = logits.clone().requires_grad_(True)
    plain = vocab_parallel_cross_entropy(plain_in, target)  # in place on its input's fp32 copy
    (plain * upstream).sum().backward()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    assert fused_in.grad.dtype == plain_in.grad.dtype == torch.bfloat16
    # The same fp32 gradient rounded to bf16 (compiled, the fp32 sums may round the last bit apart: one bf16 step).
    torch.testing.assert_close(fused_in.grad, plain_in.grad, rtol=2 ** -7, atol=1e-6)


def test_fused_cross_entropy_equals_unfused(tp1):
    with torch._dynamo.config.patch(disable=True):
        check_native_cross_entropy()


@pytest.mark.slow
def test_compiled_fusions_equal_unfused(tp1):
    """The same checks with megatron's functions compiled by inductor (on CPU tensors), as CUDA runs them."""
    torch._dynamo.reset()
    assert_same_mlp(("--openai-gelu",))
    check_bias_dropout_add()
    check_native_cross_entropy()


@pytest.mark.gpu
def test_compiled_fusions_on_cuda(tp1):
    """The picked fusions compiled by inductor for CUDA: fused MLP (bf16 and fp32), bias-dropout-add, native CE."""
    torch._dynamo.reset()
    args = args_of("--openai-gelu")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = torch.randn(S, B, H, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
        results = [mlp_output_and_grads(mlp_from(build_transformer_config(args, device_type=d)).to("cuda", dtype), x)
                   for d in ("cuda", "cpu")]
        torch.testing.assert_close(results[0][0], results[1][0], rtol=tol, atol=tol)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=tol, atol=tol)
    check_bias_dropout_add("cuda")
    check_native_cross_entropy("cuda")
