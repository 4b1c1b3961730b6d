"""tools/evaluate.py under torchrun (2 processes on gloo, ONE launch) against the same tool in one process.

Tiny TP1 checkpoints (NTP GPT-2, CoCoMix; Llama-style at TP2) evaluated at TP2, at PP2 and at DP2 (and a Hugging Face export
shared over DP2) give the one-process numbers: loss, ppl, bits per byte, tokens, parameter count and the concept
metrics, to 1e-5; a layout the world cannot take is one `error:` line from one rank, and one process refuses a
split layout.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.evaluation.test_concepts import SPLIT, teacher_flags
from tests.helpers.evaluation_data import run_evaluate
from tests.helpers.launch import EVALUATE_WORKER, run_script

NUMBERS = ("loss", "ppl", "bits_per_byte", "nll", "parameters", "concept_loss", "concept_top1_acc",
           "concept_topk_acc")
COUNTS = ("tokens", "bytes", "documents", "context", "stride", "concept_label_count", "concept_tokens")


def rows_of(path: str) -> list:
    with open(path) as f:
        return json.load(f)["models"]


@pytest.fixture(scope="module")
def launch(tiny_checkpoints, exports, token_data, tmp_path_factory):
    """(flags shared by every run, {run: output JSON}, [exit status, stderr per rank] per run) of one launch."""
    prefix, _ = token_data
    root = tmp_path_factory.mktemp("dist_eval")
    common = ["--data-path", prefix, "--split", SPLIT, "--eval-split", "test", "--batch-size", "3", *teacher_flags()]
    models = ["--load", tiny_checkpoints["gpt2"], tiny_checkpoints["cocomix"]]
    runs = {"bad": [*models, *common, "--tensor-model-parallel-size", "3"],
            # llama: GQA, SwiGLU (its fused fc1 is saved as two halves), untied output layer
            "tp2": [*models, tiny_checkpoints["llama"], *common, "--tensor-model-parallel-size", "2"],
            "pp2": [*models, *common, "--pipeline-model-parallel-size", "2"],
            # saved TP1 / PP1: two data-parallel replicas, and the export on both ranks
            "dp2": [*models, "--hf-model", exports["cocomix"], *common]}
    outputs = {name: str(root / f"{name}.json") for name in runs}
    spec = [[*argv, "--output-json", outputs[name]] for name, argv in runs.items()]
    with open(root / "spec.json", "w") as f:
        json.dump(spec, f)
    run_script(EVALUATE_WORKER, [str(root / "spec.json"), str(root / "result.json")], nproc=2, timeout=300)
    with open(root / "result.json") as f:
        results = dict(zip(runs, json.load(f)))
    return common, outputs, results


def test_layouts_give_the_one_process_numbers(launch, tiny_checkpoints, exports, tmp_path):
    common, outputs, results = launch
    path = str(tmp_path / "one.json")
    code, _, err = run_evaluate(["--load", tiny_checkpoints["gpt2"], tiny_checkpoints["cocomix"],
                                 tiny_checkpoints["llama"], "--hf-model", exports["cocomix"], *common,
                                 "--output-json", path])
    assert code == 0, err[-3000:]
    expected = {row["name"]: row for row in rows_of(path)}
    assert "concept_loss" in expected["cocomix"] and "concept_loss" not in expected["gpt2"]
    for run, layout, names in (("tp2", (2, 1, 1), ["gpt2", "cocomix", "llama"]),
                               ("pp2", (1, 2, 1), ["gpt2", "cocomix"]),
                               ("dp2", (1, 1, 2), ["gpt2", "cocomix", "eval_cocomix"])):
        assert results[run][0] == 0, results[run]
        rows = rows_of(outputs[run])
        assert [row["name"] for row in rows] == names
        for row in rows:
            reference = expected[row["name"]]
            if row["kind"] == "checkpoint":
                assert tuple(row["layout"][k] for k in ("tensor", "pipeline", "data")) == layout
            assert set(k for k in NUMBERS + COUNTS if k in reference) <= set(row), (run, row["name"])
            for key in NUMBERS:
                if key in reference:
                    assert row[key] == pytest.approx(reference[key], rel=1e-5), (run, row["name"], key)
            for key in COUNTS:
                if key in reference:
                    assert row[key] == reference[key], (run, row["name"], key)


def test_a_layout_the_world_cannot_take_is_one_error_line(launch):
    _, outputs, results = launch
    code, rank0, rank1 = results["bad"]
    lines = rank0.strip().splitlines()
    assert code == 2 and len(lines) == 1, results["bad"]
    assert lines[0].startswith("error: world size 2 is not divisible by --tensor-model-parallel-size 3"), lines
    assert "error" not in rank1
    assert not os.path.exists(outputs["bad"])


def test_one_process_refuses_a_split_layout(tiny_checkpoints, token_data):
    code, out, err = run_evaluate(["--load", tiny_checkpoints["gpt2"], "--data-path", token_data[0],
                                   "--tensor-model-parallel-size", "2"])
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("error: --tensor-model-parallel-size 2: one process evaluates at TP1"), lines
