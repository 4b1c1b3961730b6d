"""The runs of the card's tests (tests/gpu/): flags of a tiny GPT-2-tokenised student on the shipped Shakespeare
tokens, its random teacher and SAE (tools/make_tiny_teacher.py), and the 386M benchmark configurations of
benchmarks/gpu_benchmark.sh.

Tiny: a 4 x 128 student (4 heads, seq 128, micro-batch 4) with CoCoMix online labels from a random 3 x 64 GPT-2
teacher at hidden_states[2] and a 512-latent TopK SAE (k 8), concept layer 2, dropout off: the configuration whose
CUDA and CPU losses benchmarks/gpu_h200.md compares.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Dict, List, Optional

from tests.helpers.paths import GPT2_FLAGS, ROOT

FP32_ITERS, BF16_ITERS = 5, 8  # iterations of the tiny runs: fp32 (CUDA vs CPU), bf16 (each method and back end)
TINY_TEACHER = ["--layers", "3", "--hidden", "64", "--heads", "4", "--positions", "128", "--num-latents", "512",
                "--sae-k", "8", "--seed", "0"]
# A GPT-2-124M-shaped random teacher and a 32768-latent SAE with k 32: the shapes of the paper's teacher (speed
# and memory do not depend on the weights).
BENCHMARK_TEACHER = ["--layers", "12", "--hidden", "768", "--heads", "12", "--positions", "1024",
                     "--num-latents", "32768", "--sae-k", "32", "--seed", "0"]


def quickstart_data(scratch: str) -> str:
    """Prefix of the shipped corpus as GPT-2 BPE tokens: data_cache/ when examples/prepare_quickstart_data.sh has
    made it, else made into `scratch`."""
    prefix = os.path.join(ROOT, "data_cache", "shakespeare_text_document")
    if not os.path.isfile(prefix + ".idx"):
        subprocess.run(["bash", os.path.join(ROOT, "examples", "prepare_quickstart_data.sh")], cwd=ROOT, check=True,
                       capture_output=True, env=dict(os.environ, OUTPUT_DIR=scratch))
        prefix = os.path.join(scratch, "shakespeare_text_document")
    return prefix


def make_teacher(output_dir: str, shape: List[str]) -> str:
    """tools/make_tiny_teacher.py into `output_dir` (teacher/ and sae/); returns `output_dir`."""
    from tools import make_tiny_teacher

    assert make_tiny_teacher.main(["--output-dir", output_dir, *shape]) == 0
    return output_dir


def tiny_student(data_prefix: str, train_iters: int, bf16: bool = False) -> List[str]:
    """The tiny student, trained on the shipped corpus with the log line at every iteration."""
    return [
        "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
        "--max-position-embeddings", "128", "--attention-dropout", "0", "--hidden-dropout", "0",
        "--data-path", data_prefix, *GPT2_FLAGS, "--num-workers", "1",
        "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", str(train_iters),
        "--lr", "2e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234", "--log-interval", "1", "--eval-iters", "0",
        *(["--bf16"] if bf16 else []),
    ]


def teacher_flags(assets: str) -> List[str]:
    """The teacher and SAE of `assets` (make_teacher's folder) at the tiny student's hook."""
    return ["--teacher-model", os.path.join(assets, "teacher"), "--teacher-layer", "2",
            "--sae", os.path.join(assets, "sae")]


def tiny_cocomix(assets: Optional[str] = None, labels: Optional[str] = None) -> List[str]:
    """CoCoMix at the tiny student's concept layer: online labels from `assets`, or precomputed `labels`."""
    flags = ["--cocomix", "--concept-layer", "2", "--concept-topk", "8"]
    return flags + (["--concept-labels", labels] if labels else teacher_flags(assets))


# benchmarks/gpu_benchmark.sh at SIZE=386m: seq 1024, micro-batch 8, bf16, dropout off.
BENCHMARK_386M = {
    "ntp": ["--num-layers", "24", "--hidden-size", "1072", "--num-attention-heads", "16"],
    "cocomix": ["--num-layers", "24", "--hidden-size", "1024", "--num-attention-heads", "16", "--concept-layer", "5",
                "--cocomix", "--concept-topk", "32"],
}


def benchmark_common(data_prefix: str, train_iters: int) -> List[str]:
    return ["--seq-length", "1024", "--max-position-embeddings", "1024", "--micro-batch-size", "8",
            "--global-batch-size", "8", "--train-iters", str(train_iters), "--lr", "3e-4", "--min-lr", "3e-5",
            "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--bf16", "--attention-dropout", "0", "--hidden-dropout", "0", "--data-path", data_prefix, *GPT2_FLAGS,
            "--log-interval", str(train_iters), "--eval-iters", "0", "--num-workers", "2"]


def benchmark_teacher(assets: str) -> List[str]:
    return ["--teacher-model", os.path.join(assets, "teacher"), "--teacher-layer", "6",
            "--sae", os.path.join(assets, "sae")]


_FLOAT = r"([0-9.]+(?:[eE][-+]?[0-9]+)?)"


def memory_numbers(stdout: str) -> Dict[str, float]:
    """The start-up estimate (stage 0 total, MB) and the last log line's peak allocated / reserved memory (MB)."""
    estimate = re.search(r"memory estimate per device, stage 0 \(MB\):.*\| total " + _FLOAT, stdout)
    allocated = re.findall(r"max allocated memory \(MB\): " + _FLOAT, stdout)
    reserved = re.findall(r"max reserved memory \(MB\): " + _FLOAT, stdout)
    assert estimate and allocated and reserved, f"no memory estimate or GPU memory on the log line:\n{stdout[-3000:]}"
    return {"estimate": float(estimate.group(1)), "allocated": float(allocated[-1]), "reserved": float(reserved[-1])}
