"""Tiny checkpoints for the Hugging Face tests: ONE training launch per parallel layout (several model variants
trained one after the other by tests/helpers/multi_run_worker.py), built at most once per session.

Variants: cocomix (learned positions, GPT-2's gelu_new: the official student's shape), cocomix_rope, pause (pause
tokens), gpt2 (NTP -> GPT2LMHeadModel), llama (NTP, rotary + RMSNorm + SwiGLU + GQA, no biases, untied ->
LlamaForCausalLM); in the DP2 launch also cocomix_zero1 (DeepSpeed ZeRO-1) and gpt2_distopt (megatron's distributed
optimizer) and gpt2_zero2 (ZeRO-2), gpt2 and llama there using ZeRO-3. Every run trains 2 steps from the layout-independent initialisation, so the same variant at
two layouts holds (nearly) the same weights.
"""

from __future__ import annotations

import json
import os

import pytest

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


_TRAINED = {}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """checkpoints(layout) -> {variant: checkpoint dir}, trained on first use."""
    def get(layout: str) -> dict:
        if layout not in _TRAINED:
            _TRAINED[layout] = train_layout(layout, str(tmp_path_factory.mktemp(f"ckpt_{layout}")))
        return _TRAINED[layout]
    return get


@pytest.fixture(scope="session")
def export_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("exports"))
