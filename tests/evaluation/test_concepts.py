"""tools/evaluate.py's CoCoMix concept prediction (concept loss, top-1 / top-k accuracy against the teacher's labels).

- the numbers equal a plain-torch computation over the same windows (the held-out documents concatenated and cut
  into --seq-length windows, built here by hand) with the export's concept logits and the teacher's labels;
- a checkpoint (--load) and its export give the same numbers; an NTP model gets no concept entries;
- labels written by tools/extract_concepts.py --eval-split and read with --concept-labels give the online numbers;
  training refuses such a file;
- bad inputs: one `error:` line.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy
import pytest
import torch

from tests.helpers.cocomix_assets import TEACHER_LAYER, tiny_sae, tiny_teacher
from tests.helpers.evaluation_data import CONTEXT, run_evaluate

SPLIT = "6,2,2"


def teacher_flags():
    return ["--teacher-model", tiny_teacher(), "--teacher-layer", str(TEACHER_LAYER), "--sae", tiny_sae()]


def held_out(token_data, eval_split="test"):
    """The documents of SPLIT's eval_split, in order (computed here from the split weights as megatron does:
    round(bound x N))."""
    _, docs = token_data
    n = len(docs)
    weights = [float(w) for w in SPLIT.split(",")]
    bounds = numpy.cumsum([0.0] + [w / sum(weights) for w in weights])
    part = {"train": 0, "valid": 1, "test": 2}[eval_split]
    return docs[int(round(bounds[part] * n)):int(round(bounds[part + 1] * n))]


def reference(export_dir: str, docs, topk: int) -> dict:
    """Concept metrics of the export over consecutive CONTEXT-token windows of the concatenated documents."""
    from transformers import AutoModelForCausalLM

    from megatron_cocomix.concepts import attribution_labels, load_sae, load_teacher

    stream = numpy.concatenate(docs)
    windows = torch.from_numpy(stream[:len(stream) // CONTEXT * CONTEXT].reshape(-1, CONTEXT).astype(numpy.int64))
    teacher = load_teacher(tiny_teacher(), TEACHER_LAYER)
    labels = attribution_labels(teacher, load_sae(tiny_sae()).freeze(), windows, 4)
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        z = model.concept_logits(windows).double()
    log_p = torch.log_softmax(z, dim=-1)
    nll, top1, top1_total, topk_hits = [], 0, 0, 0
    best = z.topk(topk, dim=-1).indices
    for i in range(windows.shape[0]):
        for t in range(CONTEXT):
            label = labels[i, t].tolist()
            nll += [-float(log_p[i, t, c]) for c in label if c >= 0]
            if label[0] >= 0:
                top1_total += 1
                top1 += int(int(z[i, t].argmax()) == label[0])
            topk_hits += sum(1 for c in label if c >= 0 and c in best[i, t].tolist())
    return {"concept_loss": sum(nll) / len(nll), "concept_top1_acc": top1 / top1_total,
            "concept_topk_acc": topk_hits / len(nll), "concept_label_count": len(nll),
            "concept_tokens": windows.numel()}


def evaluate_rows(args, tmp_path) -> list:
    path = str(tmp_path / "out.json")
    code, out, err = run_evaluate([*args, "--output-json", path])
    assert code == 0, err[-3000:]
    with open(path) as f:
        return json.load(f)["models"], out


def test_concept_metrics_equal_plain_torch(tiny_checkpoints, exports, token_data, tmp_path):
    prefix, _ = token_data
    rows, out = evaluate_rows(["--load", tiny_checkpoints["cocomix"], "--hf-model", exports["cocomix"],
                               exports["gpt2"], "--data-path", prefix, "--split", SPLIT, "--eval-split", "test",
                               *teacher_flags()], tmp_path)
    expected = reference(exports["cocomix"], held_out(token_data), topk=4)
    for row in rows[:2]:  # the checkpoint's megatron model and its export
        assert row["concept_topk"] == 4
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (row["name"], key)
    assert "concept_loss" not in rows[2]  # NTP: no concept layer
    assert 0 < expected["concept_topk_acc"] < 1 and expected["concept_label_count"] > 100
    assert "| concept loss | concept top-1 acc | concept top-k acc |" in out
    assert out.count("(chance 0.0156)") == 2  # top-1 chance 1 / C with C = 64


def test_labels_file_gives_the_online_numbers(exports, token_data, tmp_path, single_process):
    from tools import extract_concepts

    prefix, _ = token_data
    labels = str(tmp_path / "held_out_labels")
    data_flags = ["--data-path", prefix, "--split", SPLIT, "--seq-length", str(CONTEXT)]
    assert extract_concepts.main([*data_flags, "--eval-split", "test", "--tokenizer-type", "NullTokenizer",
                                  "--vocab-size", "255", "--concept-num-labels", "4", *teacher_flags(),
                                  "--output-prefix", labels, "--no-progress", "--no-tokenizer-check"]) == 0
    evaluate_flags = ["--hf-model", exports["cocomix"], "--data-path", prefix, "--split", SPLIT,
                      "--eval-split", "test"]
    from_file, _ = evaluate_rows([*evaluate_flags, "--concept-labels", labels], tmp_path)
    online, _ = evaluate_rows([*evaluate_flags, *teacher_flags()], tmp_path)
    for key in ("concept_loss", "concept_top1_acc", "concept_topk_acc", "concept_label_count"):
        assert from_file[0][key] == online[0][key], key

    # Labels of other documents are refused, and training refuses held-out labels.
    code, _, err = run_evaluate([*evaluate_flags[:-1], "valid", "--concept-labels", labels])
    assert code == 2 and err.startswith("error: --concept-labels ") and "eval_split" in err, err
    from pretrain_cocomix import _attach_precomputed_labels

    with pytest.raises(ValueError, match="held-out test windows"):
        _attach_precomputed_labels(argparse.Namespace(concept_labels=labels, teacher_model=None, sae=None), None)


@pytest.mark.parametrize("case", ["incomplete_teacher", "labels_and_teacher", "no_data", "missing_labels",
                                  "missing_sae"])
def test_bad_concept_flags_one_error_line(case, exports, token_data, tmp_path):
    prefix, _ = token_data
    base = ["--hf-model", exports["cocomix"], "--data-path", prefix]
    args = {"incomplete_teacher": [*base, "--teacher-model", tiny_teacher(), "--sae", tiny_sae()],
            "labels_and_teacher": [*base, *teacher_flags(), "--concept-labels", str(tmp_path / "x")],
            "no_data": ["--hf-model", exports["cocomix"], "--tasks", "piqa", "--task-data-dir", str(tmp_path),
                        *teacher_flags()],
            "missing_labels": [*base, "--concept-labels", str(tmp_path / "none")],
            "missing_sae": [*base, "--teacher-model", tiny_teacher(), "--teacher-layer", "1",
                            "--sae", str(tmp_path / "no_sae")]}[case]
    code, _, err = run_evaluate(args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert {"incomplete_teacher": "--teacher-layer", "labels_and_teacher": "--concept-labels",
            "no_data": "--data-path", "missing_labels": os.path.join(str(tmp_path), "none"),
            "missing_sae": "no_sae"}[case] in lines[0]
