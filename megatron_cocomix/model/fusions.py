"""Which of megatron-core's fused kernels a run uses, decided per device from the flags (docs/performance.md).

megatron-core 0.16's fusions, and what each needs:

| TransformerConfig field          | kernel                                              | needs                       |
|----------------------------------|-----------------------------------------------------|-----------------------------|
| bias_activation_fusion           | bias + GELU (tanh form) or bias + SwiGLU            | torch (`jit_fuser`)         |
| bias_dropout_fusion              | bias + dropout + residual add                       | torch (`jit_fuser`)         |
| cross_entropy_loss_fusion native | vocab-parallel CE, one all-reduce for both sums     | torch (`jit_fuser`)         |
| masked_softmax_fusion            | scaled masked softmax (--attention-backend local)   | compiled CUDA extensions    |
| persist_layer_norm               | apex's persistent LayerNorm                         | apex                        |
| gradient_accumulation_fusion     | weight-gradient GEMM accumulating into main_grad    | apex (or TE), megatron DDP  |
| apply_rope_fusion                | fused RoPE                                          | Transformer Engine          |

`jit_fuser` (megatron/core/jit.py) is torch.compile: Triton kernels on CUDA. On CPU it would compile C++ with
inductor (tens of seconds per function on a small machine) for no gain, so every fusion stays off there: the
unfused paths are the same maths, and CPU runs are for checking, not speed.

On CUDA a fusion is on unless its flag turns it off (Megatron-LM's names and defaults), except where it would
change the numbers:
- megatron's fused bias-GELU computes the tanh approximation whatever the activation, so it is used only with
  --openai-gelu (the tanh form; the config then names F.gelu, the only GELU megatron's fused path accepts) and
  with biases (it adds one); exact GELU keeps the unfused path;
- the native fused cross-entropy returns bf16 logit gradients, so it needs --bf16 (where the unfused backward
  rounds them to bf16 too), and stays opt-in (--cross-entropy-loss-fusion) as in Megatron-LM;
- dropout inside a compiled kernel draws its mask from another random stream than eager dropout: same
  distribution, other masks (and without dropout, or in evaluation, the same numbers).
"""

from __future__ import annotations

import argparse
import importlib.util

import torch.nn.functional as F

_SOFTMAX_EXTENSIONS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                       "scaled_softmax_cuda")


def module_available(name: str) -> bool:
    """Importable without importing it (a CUDA extension may be absent, or fail to load, on other machines)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def fusion_settings(args: argparse.Namespace, device_type: str) -> dict:
    """TransformerConfig fields for megatron-core's fusions on `device_type` ("cuda" or "cpu"); see the module
    docstring. May also return `activation_func` (F.gelu, for the fused tanh GELU of --openai-gelu)."""
    settings = dict(bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
                    persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
                    cross_entropy_loss_fusion=False, cross_entropy_fusion_impl="native")
    if device_type != "cuda":
        return settings
    bias = not args.disable_bias_linear
    if args.swiglu:
        settings["bias_activation_fusion"] = args.bias_swiglu_fusion
    elif args.openai_gelu and bias and args.bias_gelu_fusion:
        settings.update(bias_activation_fusion=True, activation_func=F.gelu)
    settings["bias_dropout_fusion"] = args.bias_dropout_fusion
    settings["cross_entropy_loss_fusion"] = args.cross_entropy_loss_fusion and args.bf16
    settings["masked_softmax_fusion"] = (args.masked_softmax_fusion and args.attention_backend == "local"
                                         and all(module_available(m) for m in _SOFTMAX_EXTENSIONS))
    apex_layer_norm = module_available("apex.contrib.layer_norm") and args.normalization == "LayerNorm"
    settings["persist_layer_norm"] = args.persist_layer_norm and apex_layer_norm
    settings["gradient_accumulation_fusion"] = (args.gradient_accumulation_fusion and not args.deepspeed
                                                and module_available("fused_weight_gradient_mlp_cuda"))
    return settings
