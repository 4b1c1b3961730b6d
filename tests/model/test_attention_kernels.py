"""Every attention layer of the student runs a fused SDPA kernel, forward and backward, for NTP and for CoCoMix (the
layers from the concept layer on, which attend over 2s interleaved positions, included): never the math fallback,
which materialises the [b, heads, s, s] scores (model/attention.py).

One short training run per model in this process (tests/helpers/in_process.py) under
`torch.nn.attention.sdpa_kernel(<the device's fused back ends>)`, so a fallback to the math kernel raises, and
under a dispatch mode that records each SDPA kernel the dispatcher runs together with the layer it runs for
(forward hooks and full backward hooks on each layer's core attention). Every layer must run exactly one fused
kernel per micro-batch in each direction, on s positions below the concept layer and 2s from it on.

CPU: the flash kernel (causal, no dropout). CUDA (marked gpu): flash, memory-efficient or cuDNN, in bf16 at the
386M benchmark's widths (NTP hidden 1072 with 16 heads, head dim 67; CoCoMix 1024 / 16) with the paper's
attention dropout 0.1, on 256 tokens.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers.cocomix_assets import tiny_sae, tiny_teacher
from tests.helpers.in_process import attention_layers, train_in_process
from tests.helpers.launch import TINY_GPT

FUSED = {
    "cpu": ([SDPBackend.FLASH_ATTENTION], {"_scaled_dot_product_flash_attention_for_cpu"}),
    "cuda": ([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION],
             {"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention"}),
}
RUN = ["--train-iters", "2", "--global-batch-size", "2", "--eval-iters", "0"]  # 2 iterations of 1 micro-batch
MICRO_BATCHES = 2
# device: (sequence length, flags of both models, {model: (its flags, layers, concept layer index or None)})
MODELS = {
    "cpu": (32, [], {"ntp": ([], 4, None), "cocomix": (["--concept-layer", "2"], 4, 2)}),
    "cuda": (256, ["--seq-length", "256", "--max-position-embeddings", "256", "--bf16", "--attention-dropout", "0.1"],
             {"ntp": (["--num-layers", "2", "--hidden-size", "1072", "--num-attention-heads", "16"], 2, None),
              "cocomix": (["--num-layers", "3", "--hidden-size", "1024", "--num-attention-heads", "16",
                           "--concept-layer", "1"], 3, 1)}),
}
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason=(
               "training in this process runs on the GPU here: the cuda case checks it"))),
           pytest.param("cuda", marks=pytest.mark.gpu)]


class KernelLog(TorchDispatchMode):
    """The SDPA kernels the dispatcher runs: (layer number or None, 'forward' / 'backward', op, positions)."""

    def __init__(self):
        super().__init__()
        self.where = None
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "scaled_dot_product" in name:
            layer, phase = self.where or (None, None)
            # query (forward) or the output's gradient (backward): [b, heads, positions, head dim]
            self.calls.append((layer, phase, name, args[0].shape[-2]))
        return func(*args, **(kwargs or {}))

    def watch(self, model) -> None:
        """Tag the kernels each layer's core attention runs, in forward and in backward."""
        for number, attention in attention_layers(model):
            core = attention.core_attention
            core.register_forward_pre_hook(lambda m, args, n=number: setattr(self, "where", (n, "forward")))
            core.register_forward_hook(lambda m, args, out: setattr(self, "where", None))
            core.register_full_backward_pre_hook(lambda m, grad, n=number: setattr(self, "where", (n, "backward")))
            core.register_full_backward_hook(lambda m, grad_in, grad_out: setattr(self, "where", None))

    def unfused_layers(self, num_layers: int, seq: int, concept_layer, fused: set) -> list:
        """One line per layer and direction that did not run one fused kernel per micro-batch on the positions it
        attends over: 2s from the concept layer's index on (layer numbers count from 1)."""
        problems = []
        for layer in range(1, num_layers + 1):
            positions = 2 * seq if concept_layer is not None and layer > concept_layer else seq
            for phase, suffix in (("forward", ""), ("backward", "_backward")):
                calls = [(name, n) for at, p, name, n in self.calls if (at, p) == (layer, phase)]
                if len(calls) != MICRO_BATCHES or any(name.removesuffix(suffix) not in fused or n != positions
                                                      for name, n in calls):
                    problems.append(f"layer {layer} {phase}: {calls or 'no SDPA kernel'} (want {MICRO_BATCHES} "
                                    f"fused kernels on {positions} positions)")
        return problems


def record(argv, device: str) -> KernelLog:
    log = KernelLog()

    def model_provider(pre_process=True, post_process=True, vp_stage=None):
        import pretrain_cocomix

        model = pretrain_cocomix.model_provider(pre_process, post_process, vp_stage)
        log.watch(model)
        return model

    with sdpa_kernel(FUSED[device][0]), log:
        train_in_process(argv, model_provider=model_provider)
    return log


def model_flags(model: str, device: str) -> tuple:
    """(flags, sequence length, layers, concept layer index or None) of the model on this device."""
    seq, common, models = MODELS[device]
    flags, layers, concept_layer = models[model]
    flags = TINY_GPT + RUN + common + flags
    if concept_layer is not None:
        flags += ["--cocomix", "--concept-topk", "4", "--teacher-model", tiny_teacher(positions=max(seq, 64)),
                  "--teacher-layer", "1", "--sae", tiny_sae()]
    return flags, seq, layers, concept_layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", ["ntp", "cocomix"])
def test_every_layer_runs_a_fused_kernel(model, device, single_process):
    flags, seq, layers, concept_layer = model_flags(model, device)
    log = record(flags, device)
    print(f"\n{model} on {device}: {Counter((p, name) for at, p, name, n in log.calls if at is not None)}")
    assert log.unfused_layers(layers, seq, concept_layer, FUSED[device][1]) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU check of the check")
def test_an_unfused_attention_is_reported(single_process):
    """megatron's own core attention (--attention-backend local: materialised scores, separate softmax) runs no SDPA
    kernel: every layer is reported, in both directions."""
    flags, seq, layers, concept_layer = model_flags("ntp", "cpu")
    log = record(flags + ["--attention-backend", "local"], "cpu")
    problems = log.unfused_layers(layers, seq, concept_layer, FUSED["cpu"][1])
    assert len(problems) == 2 * layers and all("no SDPA kernel" in line for line in problems), problems
