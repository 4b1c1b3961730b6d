"""Expected FLOPs and hours of each stage of examples/pipeline_gpu.sh (the paper's 69M runs on GPUs).

    python examples/pipeline_gpu_estimate.py                           # GPT-2 teacher, SAE trained, 20B tokens
    python examples/pipeline_gpu_estimate.py --labels online --sae /models/v5_32k_layer_6.pt --gpus 16

The students' arguments are those examples/pretrain_paper.sh builds for SIZE=69m (the same flag files, joined in
its order, validated by `parse_args` at --gpus ranks); the FLOPs are megatron_cocomix.training.flops' count for
them, so the numbers follow any change to the configs or to the count (docs/design.md §16):
  sae       SAE training: the teacher forward up to hidden_states[teacher layer] (`layer_linear_flops` +
            `layer_attention_core_flops` per block) plus the SAE encoder twice (forward and its weight gradient;
            the "SAE encode" term) per window of the students' sequence length
  labels    label extraction: the online-label teacher terms (`teacher_flops_per_sequence`: forward, partial
            backward to the hook, SAE encode, attribution) for every training sample
  cocomix / ntp / kd   `flops_per_sequence` x samples (model FLOPs: no recompute); the teacher terms of online
            labels and KD are part of it
  evaluate  tools/evaluate.py on one GPU: every model's forward twice per scored token (sliding windows with
            stride = context / 2), plus the labels and the CoCoMix forward once for the concept accuracy

Hours = bf16 FLOPs / (GPUs x bf16 peak x MFU) + fp32 FLOPs / (GPUs x fp32 peak x fp32 efficiency). The students
train in bf16; the teacher and the SAE run in fp32 (--teacher-dtype fp32, the default; no TF32), whose peak is
15x lower. Assumptions, from benchmarks/gpu_h200.md (386M, seq 1024, one H200): bf16 work at the NTP run's MFU
(17.9% and 20.4% in two sittings: 19%); fp32 work at 80% of the fp32 peak, the value with which this model
reproduces the measured 386M CoCoMix online step (15.3-15.6% MFU; `calibration()` prints what it predicts). The
peaks are megatron_cocomix.training.hardware's for H100 / H200 (989 TFLOP/s bf16, 67 fp32). Left out:
communication (8 GPUs of one node, 4 micro-batches per step), data loading, top-k and other non-matmul work,
start-up and checkpoints. A 69M model's small matmuls run at a lower utilisation than the measured 386M ones, so
read the hours as a lower bound.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.errors import cli_main  # noqa: E402

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(EXAMPLES, "configs")
SIZE = "69m"
# The teachers' published config.json values (GPT-2 124M; SmolLM2-135M), for when no --teacher-model is given.
PUBLISHED_TEACHERS = {
    "gpt2": {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024,
             "vocab_size": 50257},
    "smollm2": {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152},
}
OPENAI_V5_SAE = (32768, 32)  # latents, k of OpenAI's GPT-2 v5 32k SAEs
SAE_SEQUENCES_PER_STEP = 16  # examples/pipeline_gpu.sh's tools/train_sae.py --sequences-per-step
NTP_MFU = 0.19
FP32_EFFICIENCY = 0.80
MEASURED_386M_COCOMIX_MFU = (0.153, 0.156)
# The test split of OpenWebText (~9.0B GPT-2 tokens) under --split 969,30,1.
DEFAULT_EVAL_TOKENS = 9_000_000


def read_flag_file(path: str) -> List[str]:
    """As examples/common.sh's read_args and pretrain_cocomix.py read a flag file: `#` lines are comments."""
    with open(path) as f:
        return [token for line in f if not line.lstrip().startswith("#") for token in line.split()]


def teacher_shape(teacher: str, teacher_model: Optional[str]):
    from megatron_cocomix.concepts.teacher import read_teacher_shape
    from megatron_cocomix.shapes import TransformerShape

    if teacher_model:
        return read_teacher_shape(teacher_model)
    return TransformerShape.from_hf_config(PUBLISHED_TEACHERS[teacher])


def sae_shape(sae: str, num_latents: Optional[int], k: int) -> tuple:
    """(latents, k): the file's, or those of the SAE tools/train_sae.py will train (default OpenAI's 32768, the C
    that configs/69m.ntp.args matches the NTP width to)."""
    from megatron_cocomix.concepts.sae import read_sae_shape

    if sae != "train":
        shape = read_sae_shape(sae)
        return shape.num_latents, shape.k
    return num_latents or OPENAI_V5_SAE[0], k


def student_args(method: str, labels: str, train_tokens: int, gpus: int, teacher, sae: tuple,
                 size: str = SIZE) -> argparse.Namespace:
    """The arguments examples/pretrain_paper.sh gives SIZE=size METHOD=method, with the file-derived values that
    pretrain_cocomix.py reads at start-up (vocabulary, teacher shape, SAE shape) filled in. parse_args only checks
    that the input files exist; empty stand-ins take their place."""
    from megatron_cocomix.arguments import parse_args
    from megatron_cocomix.data.tokenizer import vocab_size_with_padding

    method_file = {"cocomix": "cocomix", "ntp": f"{size}.ntp", "kd": f"{size}.ntp"}[method]
    argv = []
    for name in ("paper", size, method_file):
        argv += read_flag_file(os.path.join(CONFIGS, f"{name}.args"))
    with tempfile.TemporaryDirectory() as stand_ins:
        model, sae_file, prefix = (os.path.join(stand_ins, name) for name in ("teacher", "sae.pt", "labels"))
        os.mkdir(model)
        for path in (sae_file, prefix + ".bin", prefix + ".idx", prefix + ".json"):
            open(path, "w").close()
        if method == "kd":
            argv += ["--kd", "--kd-weight", "0.1", "--teacher-model", model]
        elif method == "cocomix":
            argv += ["--concept-labels", "online", "--teacher-model", model, "--sae", sae_file] if labels == "online" \
                else ["--concept-labels", prefix]
        gpt2 = os.path.join(EXAMPLES, "data", "gpt2")
        argv += ["--data-path", os.path.join(stand_ins, "data"), "--vocab-file", os.path.join(gpt2, "encoder.json"),
                 "--merge-file", os.path.join(gpt2, "vocab.bpe")]
        parsed = parse_args(argv + ["--train-iters", "1"], world_size=gpus)  # for the batch
        tokens_per_step = parsed.global_batch_size * parsed.seq_length
        iters = -(-train_tokens // tokens_per_step)  # pretrain_paper.sh's ceil(TRAIN_TOKENS / batch tokens)
        args = parse_args(argv + ["--train-iters", str(iters), "--lr-warmup-iters", str(iters // 300),
                                  "--use-distributed-optimizer"], world_size=gpus)
    args.padded_vocab_size = vocab_size_with_padding(teacher.vocab_size, args.make_vocab_size_divisible_by,
                                                     args.tensor_model_parallel_size)
    if args.cocomix or args.kd:
        args.teacher_shape = teacher
    if args.cocomix:
        args.concept_dim, args.sae_topk = sae
    return args


def split_flops(args: argparse.Namespace) -> tuple:
    """(bf16, fp32) training FLOPs of one sequence: the student's terms, and the frozen teacher's (fp32)."""
    from megatron_cocomix.training.flops import flops_per_sequence, teacher_flops_per_sequence

    terms = flops_per_sequence(args)
    terms.pop("recompute")
    fp32 = sum(teacher_flops_per_sequence(args).values())
    return sum(terms.values()) - fp32, fp32


def hours(bf16: float, fp32: float, gpus: int, mfu: float = NTP_MFU, fp32_efficiency: float = FP32_EFFICIENCY) -> float:
    from megatron_cocomix.training.hardware import peak_tflops

    bf16_rate = gpus * peak_tflops("H100", sixteen_bit=True) * 1e12 * mfu
    fp32_rate = gpus * peak_tflops("H100", sixteen_bit=False) * 1e12 * fp32_efficiency
    return (bf16 / bf16_rate + fp32 / fp32_rate) / 3600


@dataclass
class Stage:
    name: str
    work: str
    tokens: float
    bf16: float
    fp32: float
    gpus: int
    parameters: Optional[int] = None
    memory_gib: Optional[float] = None

    @property
    def flops(self) -> float:
        return self.bf16 + self.fp32

    @property
    def hours(self) -> float:
        return hours(self.bf16, self.fp32, self.gpus)


def sae_steps(sae_tokens: int, seq_length: int, gpus: int) -> int:
    """tools/train_sae.py steps for sae_tokens teacher tokens (windows of seq_length, one position skipped)."""
    per_step = SAE_SEQUENCES_PER_STEP * (seq_length - 1) * gpus
    return -(-sae_tokens // per_step)


def estimate(teacher: str = "gpt2", teacher_model: Optional[str] = None, sae: str = "train",
             num_latents: Optional[int] = None, sae_k: int = 32, labels: str = "precomputed",
             train_tokens: int = 20_000_000_000, sae_tokens: int = 1_000_000_000,
             eval_tokens: int = DEFAULT_EVAL_TOKENS, gpus: int = 8) -> List[Stage]:
    from megatron_cocomix.training.flops import (
        layer_attention_core_flops,
        layer_linear_flops,
        teacher_flops_per_sequence,
    )
    from megatron_cocomix.training.memory import memory_estimate, parameter_counts

    shape = teacher_shape(teacher, teacher_model)
    concepts = sae_shape(sae, num_latents, sae_k)
    runs = {method: student_args(method, labels, train_tokens, gpus, shape, concepts)
            for method in ("cocomix", "ntp", "kd")}
    online = student_args("cocomix", "online", train_tokens, gpus, shape, concepts)
    s, layer = online.seq_length, online.teacher_layer
    samples = online.train_iters * online.global_batch_size
    label_terms = teacher_flops_per_sequence(online)  # per sequence of s tokens
    stages = []
    if sae == "train":
        steps = sae_steps(sae_tokens, s, gpus)
        windows = steps * SAE_SEQUENCES_PER_STEP * gpus
        to_hook = layer * (layer_linear_flops(shape, s) + layer_attention_core_flops(shape, s))
        stages.append(Stage("sae", f"TopK SAE ({concepts[0]} latents, k {concepts[1]}) on "
                                   f"hidden_states[{layer}], {steps} steps", windows * s, 0.0,
                            windows * (to_hook + 2 * label_terms["SAE encode"]), gpus))
    if labels == "precomputed":
        stages.append(Stage("labels", f"concept labels of the students' {_count(samples)} samples", samples * s, 0.0,
                            samples * sum(label_terms.values()), gpus))
    names = {"cocomix": f"CoCoMix 69M, {labels} labels", "ntp": "NTP 69M (parameter-matched)",
             "kd": "KD 69M (parameter-matched)"}
    forward_per_token = {}
    for method, args in runs.items():
        bf16, fp32 = split_flops(args)
        forward_per_token[method] = bf16 / 3 / s  # the student alone (its teacher terms are not in evaluation)
        stages.append(Stage(method, f"{names[method]}, {args.train_iters} steps", samples * s, samples * bf16,
                            samples * fp32, gpus, parameter_counts(args).unique_total,
                            memory_estimate(args)[0].total / 2 ** 30))
    teacher_forward = teacher_flops_per_sequence(runs["kd"])["teacher forward"] / s
    scored = 2 * eval_tokens * (sum(forward_per_token.values()) + teacher_forward)
    concept = eval_tokens * (sum(label_terms.values()) / s + forward_per_token["cocomix"])
    stages.append(Stage("evaluate", "perplexity (3 students, teacher), concept accuracy",
                        eval_tokens, 0.0, scored + concept, 1))
    return stages


def calibration() -> float:
    """The MFU this model predicts for benchmarks/gpu_h200.md's 386M CoCoMix online step (GPT-2-shaped teacher,
    32768-latent SAE, one GPU); measured: 15.3-15.6%."""
    from megatron_cocomix.training.hardware import peak_tflops

    shape = teacher_shape("gpt2", None)
    args = student_args("cocomix", "online", 1, 1, shape, OPENAI_V5_SAE, size="386m")
    bf16, fp32 = split_flops(args)
    seconds = hours(bf16, fp32, 1) * 3600
    return (bf16 + fp32) / seconds / (peak_tflops("H100", sixteen_bit=True) * 1e12)


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def table(stages: Sequence[Stage]) -> str:
    def flops(n: float) -> str:
        return f"{n:.2e}" if n else "-"

    lines = ["| stage | work | tokens | bf16 FLOPs | fp32 FLOPs | GPUs | hours | parameters | GiB/GPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for st in stages:
        params = _count(st.parameters) if st.parameters else "-"
        memory = f"{st.memory_gib:.1f}" if st.memory_gib is not None else "-"
        lines.append(f"| {st.name} | {st.work} | {_count(st.tokens)} | {flops(st.bf16)} | {flops(st.fp32)} | "
                     f"{st.gpus} | {st.hours:.2f} | {params} | {memory} |")
    lines.append(f"| total | | | {flops(sum(st.bf16 for st in stages))} | {flops(sum(st.fp32 for st in stages))} "
                 f"| | {sum(st.hours for st in stages):.1f} | | |")
    return "\n".join(lines)


def assumptions() -> str:
    from megatron_cocomix.training.hardware import peak_tflops

    return (f"H100/H200 peaks {peak_tflops('H100', True):g} TFLOP/s bf16, {peak_tflops('H100', False):g} fp32; "
            f"bf16 (students) at {NTP_MFU:.0%} MFU, fp32 (teacher, SAE) at {FP32_EFFICIENCY:.0%} of the fp32 peak "
            f"(predicts {calibration():.1%} MFU for the 386M CoCoMix online step, measured "
            f"{MEASURED_386M_COCOMIX_MFU[0]:.1%}-{MEASURED_386M_COCOMIX_MFU[1]:.1%}); no communication, data loading "
            "or non-matmul work: a lower bound. GiB/GPU: the student's weights, grads, optimizer shard, activations.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Expected FLOPs and hours of examples/pipeline_gpu.sh's stages.",
                                allow_abbrev=False)
    p.add_argument("--teacher", choices=sorted(PUBLISHED_TEACHERS), default="gpt2", help="The teacher LM.")
    p.add_argument("--teacher-model", default=None,
                   help="Its local directory or .gguf (the shape is read from it; default: the published config).")
    p.add_argument("--sae", default="train", help="train, or the SAE file / folder (its shape is read from it).")
    p.add_argument("--num-latents", type=int, default=None,
                   help="With --sae train: latents (default 32768, as OpenAI's GPT-2 SAE).")
    p.add_argument("--sae-k", type=int, default=32, help="With --sae train: active latents per token.")
    p.add_argument("--labels", choices=["precomputed", "online"], default="precomputed",
                   help="CoCoMix's labels: extracted once (the labels stage) or computed in the training step.")
    p.add_argument("--train-tokens", type=int, default=20_000_000_000, help="Tokens per student (the paper's 20B).")
    p.add_argument("--sae-tokens", type=int, default=1_000_000_000, help="Teacher tokens the SAE trains on.")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS,
                   help="Held-out tokens of the evaluation (default: OpenWebText's test split, ~9M).")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the training stages (all nodes).")
    return p


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    for flag in ("train_tokens", "sae_tokens", "eval_tokens", "gpus", "sae_k"):
        if getattr(a, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(a, flag)}")
    stages = estimate(a.teacher, a.teacher_model, a.sae, a.num_latents, a.sae_k, a.labels, a.train_tokens,
                      a.sae_tokens, a.eval_tokens, a.gpus)
    print(table(stages))
    print(assumptions())
    return 0


if __name__ == "__main__":
    sys.exit(main())
