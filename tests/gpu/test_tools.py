"""The tools on a machine with a GPU, on the tiny CoCoMix checkpoint trained on CUDA in fp32 (tests/gpu/conftest.py):
tools/convert_to_hf.py, tools/evaluate.py and tools/generate.py as a user runs them (their process groups on NCCL),
and the export's logits against the checkpoint's with both models on the GPU. tools/extract_concepts.py runs for
the bf16 precomputed-labels run (test_training.py compares its labels with the CPU's)."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.gpu_runs import teacher_flags
from tests.helpers.launch import EXPORT_LOGITS_WORKER, run_script
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.gpu

TOOLS = os.path.join(ROOT, "tools")
TOLERANCE = 1e-4  # as tools/convert_to_hf.py's verify: max |logit difference| and mean KL, fp32


def test_convert_verifies_the_export(export):
    """The tool's own check: the checkpoint's model (built where megatron puts it) against the written export."""
    max_diff, mean_kl = export["verify"]
    assert max_diff <= TOLERANCE and mean_kl <= TOLERANCE, export["verify"]


def test_export_logits_equal_the_checkpoints_on_cuda(fp32_runs, export):
    proc = run_script(EXPORT_LOGITS_WORKER, [fp32_runs["checkpoint"], export["path"]],
                      env={"NVIDIA_TF32_OVERRIDE": "0"})
    numbers = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{numbers}")
    assert numbers["devices"] == ["cuda:0"]
    assert numbers["max_abs_logit_diff"] <= TOLERANCE and numbers["mean_kl"] <= TOLERANCE, numbers


def test_evaluate_checkpoint_and_export_agree(fp32_runs, export, quickstart, tiny_assets, tmp_path):
    """Held-out loss and concept prediction of the checkpoint (its megatron model) and of its export, both scored by
    tools/evaluate.py on the test split's first documents: the same numbers."""
    output = str(tmp_path / "evaluate.json")
    run_script(os.path.join(TOOLS, "evaluate.py"), [
        "--load", fp32_runs["checkpoint"], "--hf-model", export["path"], "--name", "checkpoint", "export",
        "--data-path", quickstart, "--eval-split", "test", "--max-documents", "4", "--seq-length", "128",
        *teacher_flags(tiny_assets), "--output-json", output, "--no-progress"], env={"NVIDIA_TF32_OVERRIDE": "0"})
    with open(output) as f:
        rows = {row["name"]: row for row in json.load(f)["models"]}
    checkpoint, exported = rows["checkpoint"], rows["export"]
    print(f"\n{ {k: (checkpoint[k], exported[k]) for k in ('loss', 'concept_loss', 'concept_top1_acc')} }")
    assert checkpoint["tokens"] == exported["tokens"] > 0
    for key in ("loss", "bits_per_byte", "concept_loss"):
        assert abs(checkpoint[key] - exported[key]) <= 1e-4 * abs(exported[key]), (key, checkpoint[key], exported[key])
    for key in ("concept_top1_acc", "concept_topk_acc"):
        assert abs(checkpoint[key] - exported[key]) <= 1e-3, (key, checkpoint[key], exported[key])


def test_generate_from_checkpoint_and_export(fp32_runs, export):
    """Sampled continuations (same seed) of a prompt from the checkpoint (converted in memory) and from its export: the
    same text, which needs the same next-token distributions at every step (a 5-step model's greedy text is only
    newlines)."""
    flags = ["--prompt", "ROMEO:", "--seed", "3", "--max-new-tokens", "16"]
    from_checkpoint = run_script(os.path.join(TOOLS, "generate.py"), ["--load", fp32_runs["checkpoint"], *flags])
    from_export = run_script(os.path.join(TOOLS, "generate.py"), ["--hf-model", export["path"], *flags])
    print(f"\n{from_checkpoint.stdout!r}")
    assert from_checkpoint.stdout.startswith("ROMEO:") and len(from_checkpoint.stdout) > len("ROMEO:")
    assert from_checkpoint.stdout == from_export.stdout
