"""Helpers shared by the Hugging Face tests: tiny checkpoints at each parallel layout (ONE training launch per
layout, several model variants trained one after the other by multi_run_worker.py), tools/convert_to_hf.py run in
this process with its verify numbers parsed, and the logits of an export.

Variants: cocomix (learned positions, GPT-2's gelu_new: the official student's shape), cocomix_rope, pause (pause
tokens), gpt2 (NTP -> GPT2LMHeadModel), llama (NTP, rotary + RMSNorm + SwiGLU + GQA, no biases, untied ->
LlamaForCausalLM); in the DP2 launch also cocomix_zero1 (DeepSpeed ZeRO-1), gpt2_distopt (megatron's distributed
optimizer) and gpt2_zero2 (ZeRO-2), gpt2 and llama there using ZeRO-3. Every run trains 2 steps from the
layout-independent initialisation, so the same variant at two layouts holds (nearly) the same weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from typing import Dict, List, Tuple

import torch

from tests.helpers.cocomix_assets import cocomix_flags
from tests.helpers.launch import MULTI_RUN_WORKER, TINY_GPT, run_script

VARIANTS = {
    # A position table longer than the training sequences, so generation can run past --seq-length.
    "cocomix": cocomix_flags(2, 4) + ["--openai-gelu", "--max-position-embeddings", "64"],
    "cocomix_rope": cocomix_flags(2, 4) + ["--position-embedding-type", "rope"],
    "cocomix_bf16": cocomix_flags(2, 4) + ["--bf16"],  # exported in bf16 (the training dtype) by default
    "pause": ["--pause-tokens", "--concept-layer", "2", "--max-position-embeddings", "64"],
    "gpt2": ["--openai-gelu"],
    "llama": ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
              "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2"],
}
ZERO3 = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 5000, "stage3_prefetch_bucket_size": 5000,
                               "stage3_param_persistence_threshold": 100}}
ZERO1 = {"zero_optimization": {"stage": 1}}
ZERO2 = {"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                               "reduce_bucket_size": 5000}}
# Variants trained with another optimizer back end in the DP2 launch: (variant, back-end flags).
BACKENDS = {"gpt2": ["--deepspeed", "--deepspeed_config", "{zero3}"],
            "llama": ["--deepspeed", "--deepspeed_config", "{zero3}"],
            "cocomix_zero1": ["--deepspeed", "--deepspeed_config", "{zero1}"],
            "gpt2_zero2": ["--deepspeed", "--deepspeed_config", "{zero2}"],
            "gpt2_distopt": ["--use-distributed-optimizer"]}

# layout: (processes, layout flags, variants trained there)
LAYOUTS = {
    "tp1": (1, [], list(VARIANTS)),
    "tp2_pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
                ["cocomix", "llama", "gpt2"]),
    "pp2_vpp2": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
                 ["cocomix_rope", "pause", "gpt2"]),
    # DP2: DeepSpeed ZeRO-3 (gpt2, llama), ZeRO-2 (gpt2), ZeRO-1 (cocomix), megatron's distributed optimizer (gpt2).
    "dp2": (2, [], ["gpt2", "llama", "cocomix_zero1", "gpt2_zero2", "gpt2_distopt"]),
}


def train_layout(layout: str, root: str) -> dict:
    """Train the layout's variants in one launch; returns {variant: checkpoint dir}."""
    nproc, flags, variants = LAYOUTS[layout]
    configs = {}
    for name, config in (("zero3", ZERO3), ("zero1", ZERO1), ("zero2", ZERO2)):
        configs[name] = os.path.join(root, f"{name}.json")
        with open(configs[name], "w") as f:
            json.dump(config, f)
    runs, out = [], {}
    for variant in variants:
        out[variant] = os.path.join(root, variant)
        model = VARIANTS[variant.split("_zero")[0].split("_distopt")[0]]
        backend = [flag.format(**configs) for flag in BACKENDS[variant]] if layout == "dp2" else []
        argv = TINY_GPT + model + flags + backend + ["--train-iters", "2", "--eval-interval", "100",
                                                     "--save", out[variant], "--save-interval", "2"]
        runs.append([variant, "pretrain", argv])
    spec = os.path.join(root, "spec.json")
    with open(spec, "w") as f:
        json.dump(runs, f)
    run_script(MULTI_RUN_WORKER, [spec, os.path.join(root, "summary.json")], nproc=nproc, timeout=600)
    return out


VERIFY_RE = re.compile(r"verify: max abs logit diff (\S+), mean KL (\S+)")


def convert(args: List[str]) -> Tuple[int, str, str]:
    """tools/convert_to_hf.main(args) -> (exit status, stdout, stderr)."""
    from tools import convert_to_hf

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = convert_to_hf.main(args)
    return code, out.getvalue(), err.getvalue()


_EXPORTS: Dict[Tuple[str, str], Tuple[str, Dict[str, float]]] = {}


def export(checkpoint: str, root: str, key: Tuple[str, str]) -> Tuple[str, Dict[str, float]]:
    """Export `checkpoint` once per session into root/<layout>_<variant>; returns (dir, verify numbers)."""
    if key not in _EXPORTS:
        output = os.path.join(root, "_".join(key))
        code, out, err = convert(["--load", checkpoint, "--output", output])
        assert code == 0, f"convert_to_hf exited {code}:\n{out}\n{err}"
        match = VERIFY_RE.search(out)
        assert match, out
        _EXPORTS[key] = output, {"max_abs_logit_diff": float(match.group(1)), "mean_kl": float(match.group(2))}
    return _EXPORTS[key]


def logits_of(path: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits
