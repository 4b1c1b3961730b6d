"""examples/pipeline.sh end to end at its reduced size (SIZE=small), killed in the middle of a stage and re-run.

One run covers both:
- the re-run skips the finished stages, resumes the killed stage from its last checkpoint, and finishes;
- every stage's output exists and is sane: the teacher beats a unigram model on held-out text, the SAE's FVU is
  below 0.5, the CoCoMix student's concept top-k accuracy is above chance, and every student's held-out
  perplexity is finite and below the uniform distribution's (an untrained model's, up to its small initial
  logits); the results table, the curves and the CSV are written;
- the table ends with CoCoMix's and KD's tokens saved against NTP at equal validation perplexity, as computed
  here from the students' validation curves (4 evaluations each), and the CSV has the same figures.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow
PIPELINE = os.path.join(ROOT, "examples", "pipeline.sh")
STAGES = ("tokenise", "teacher", "sae", "labels", "cocomix", "ntp", "kd", "evaluate")


def _environment(run_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TEACHER", "SIZE", "SEED", "RUN_DIR")}
    env.update(SIZE="small", RUN_DIR=run_dir, PYTHON=sys.executable)
    return env


def _wait_for(path: str, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and text in open(path, errors="replace").read():
            return
        if process.poll() is not None:
            pytest.fail(f"the pipeline ended (status {process.returncode}) before {path} showed {text!r}")
        time.sleep(0.5)
    pytest.fail(f"{path} did not show {text!r} within {timeout} s")


def test_pipeline_resumes_after_a_kill_and_its_outputs_are_sane(tmp_path):
    run_dir = str(tmp_path / "run")
    env = _environment(run_dir)
    first = subprocess.Popen(["bash", PIPELINE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    cocomix_log = os.path.join(run_dir, "logs", "cocomix.log")
    try:
        # Killed (the whole process group, as a preempted job) once the CoCoMix student saved its first checkpoint.
        _wait_for(cocomix_log, "successfully saved checkpoint at iteration", first, timeout=900)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not os.path.exists(os.path.join(run_dir, "stages", "cocomix.done"))

    second = subprocess.run(["bash", PIPELINE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage in ("tokenise", "teacher", "sae", "labels"):
        assert f"{stage}: already done" in second.stdout, second.stdout
    assert "cocomix: already done" not in second.stdout
    attempts = open(cocomix_log).read().split("=== ")
    assert len(attempts) == 3 and "loaded checkpoint" in attempts[2], attempts[-1][-2000:]
    for stage in STAGES:
        assert os.path.exists(os.path.join(run_dir, "stages", f"{stage}.done")), stage

    with open(os.path.join(run_dir, "results.json")) as f:
        rows = {row["name"]: row for row in json.load(f)["models"]}
    with open(os.path.join(run_dir, "sae", "eval_sae.json")) as f:
        sae = json.load(f)
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        from pipeline_report import unigram_loss
    finally:
        sys.path.pop(0)
    teacher = rows["teacher"]
    unigram_ppl = math.exp(unigram_loss(teacher["data_path"], teacher["split"], teacher, teacher["vocab_size"]))
    assert teacher["ppl"] < unigram_ppl, (teacher["ppl"], unigram_ppl)
    assert sae["fvu"] < 0.5 and sae["l0"] > 0
    cocomix = rows["cocomix"]
    assert cocomix["concept_topk_acc"] > cocomix["concept_chance_topk"], cocomix
    for name in ("cocomix", "ntp", "kd"):
        assert math.isfinite(rows[name]["ppl"]) and rows[name]["ppl"] < rows[name]["vocab_size"], rows[name]
        assert rows[name]["tokens_seen"] == rows["ntp"]["tokens_seen"] > 0  # equal tokens
    # Parameter-matched within 1%.
    assert abs(rows["ntp"]["parameters"] / rows["cocomix"]["parameters"] - 1) < 0.01
    for name in ("results.md", "curves.png", "curves.csv"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert "| cocomix |" in second.stdout and "unigram" in second.stdout

    from megatron_cocomix.evaluation import curves

    found = {name: curves.read_curve(os.path.join(run_dir, "students", name, "tensorboard"), name)
             for name in ("ntp", "cocomix", "kd")}
    assert {len(curve) for curve in found.values()} == {4}
    comparisons = curves.compare("ntp", found)
    expected = curves.summary_lines(comparisons)
    assert [c.candidate for c in comparisons] == ["cocomix", "kd"] and len(expected) == 3
    with open(os.path.join(run_dir, "results.md")) as f:
        assert "\n" + "\n".join(expected) + "\n" in f.read()
    assert "\n" + "\n".join(expected) + "\n" in second.stdout
    with open(os.path.join(run_dir, "curves.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "tokens saved vs ntp"]
    assert {r["run"]: float(r["value"]) for r in rows} == pytest.approx({c.candidate: c.saving for c in comparisons})
