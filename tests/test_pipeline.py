"""examples/pipeline.sh end to end at its reduced size (SIZE=small, TEACHER=tiny), killed in the middle of a stage
and re-run, re-run with a second student seed, and the tools a user runs next on its outputs.

One run (a module fixture) serves every test:
- the re-run skips the finished stages, resumes the killed stage from its last checkpoint, and finishes;
- a re-run with SEEDS=1234,4321 keeps the tokenizer, teacher, SAE and the first seed's stages and runs the second
  seed's labels, students and evaluation; its table's means and standard deviations equal those computed here
  from the per-seed results files; the same command again skips everything; a stage whose recorded knobs differ
  is redone, its old outputs kept under previous/;
- every stage's output exists and is sane: the teacher beats a unigram model on held-out text, the SAE's FVU is
  below 0.5, the CoCoMix student's concept top-k accuracy is above chance, and every student's held-out
  perplexity is finite and below the uniform distribution's (an untrained model's, up to its small initial
  logits); the results table, the curves and the CSV are written;
- the table reports CoCoMix's and KD's tokens saved against NTP at equal validation perplexity, as computed
  here from the students' validation curves (4 evaluations each), and the CSV has the same figures;
- the concepts stage: latent descriptions of the SAE, the concept page of a held-out passage with those
  descriptions and the teacher's labels, one concept steered, all linked from the results table;
- docs/pipeline.md's commands after training, on the run's own files, each a fresh process with Python's warnings on
  (stderr must stay empty): generate (checkpoint and export), inspect_concepts with teacher labels (checkpoint and
  export), steer, evaluate.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.paths import ROOT, load_example

pytestmark = pytest.mark.slow
PIPELINE = os.path.join(ROOT, "examples", "pipeline.sh")
SEED_STAGES = ("labels", "cocomix", "ntp", "kd", "evaluate")
STAGES = ("tokenise", "teacher", "sae", *(f"{stage}.seed1234" for stage in SEED_STAGES), "concepts")


def _environment(run_dir: str, **knobs: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TEACHER", "SIZE", "SEED", "SEEDS", "RUN_DIR")}
    env.update(TEACHER="tiny", SIZE="small", RUN_DIR=run_dir, PYTHON=sys.executable, **knobs)
    return env


def _students(run_dir: str, seed: int = 1234) -> str:
    return os.path.join(run_dir, f"seed{seed}", "students")


def _wait_for(path: str, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and text in open(path, errors="replace").read():
            return
        if process.poll() is not None:
            pytest.fail(f"the pipeline ended (status {process.returncode}) before {path} showed {text!r}")
        time.sleep(0.5)
    pytest.fail(f"{path} did not show {text!r} within {timeout} s")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(run dir, the re-run's stdout, the CoCoMix stage's log split by attempt) of one killed and resumed run."""
    run_dir = str(tmp_path_factory.mktemp("pipeline") / "run")
    env = _environment(run_dir)
    first = subprocess.Popen(["bash", PIPELINE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    cocomix_log = os.path.join(run_dir, "logs", "cocomix.seed1234.log")
    try:
        # Killed (the whole process group, as a preempted job) once the CoCoMix student saved its first checkpoint.
        _wait_for(cocomix_log, "successfully saved checkpoint at iteration", first, timeout=900)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not os.path.exists(os.path.join(run_dir, "stages", "cocomix.seed1234.done"))

    second = subprocess.run(["bash", PIPELINE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return run_dir, second.stdout, open(cocomix_log).read().split("=== ")


def test_pipeline_resumes_after_a_kill_and_its_outputs_are_sane(pipeline):
    run_dir, stdout, attempts = pipeline
    for stage in STAGES[:4]:
        assert f"{stage}: already done" in stdout, stdout
    assert "cocomix.seed1234: already done" not in stdout
    assert len(attempts) == 3 and "loaded checkpoint" in attempts[2], attempts[-1][-2000:]
    for stage in STAGES:
        assert os.path.exists(os.path.join(run_dir, "stages", f"{stage}.done")), stage

    rows = _results(run_dir)
    with open(os.path.join(run_dir, "sae", "eval.json")) as f:
        sae = json.load(f)
    unigram_loss = load_example("pipeline_report").unigram_loss
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
    for name in ("results.md", "results.json", "seed1234/curves.png", "seed1234/curves.csv"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert "| cocomix |" in stdout and "unigram" in stdout


def _results(run_dir: str, seed: int = 1234) -> dict:
    with open(os.path.join(run_dir, f"seed{seed}", "results.json")) as f:
        return {row["name"]: row for row in json.load(f)["models"]}


def _descriptions(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "latents.jsonl"), encoding="utf-8") as f:
        return {record["index"]: record for record in map(json.loads, f)}


def test_concepts_stage_pages_and_steering(pipeline):
    """latents.jsonl has every latent (live ones described by their top tokens and contexts), the concept page
    names the student's concepts by those descriptions beside the teacher's labels, and the steering table is
    printed, saved and linked."""
    run_dir, stdout, _ = pipeline
    records = _descriptions(run_dir)
    with open(os.path.join(run_dir, "sae", "final", "cfg.json")) as f:
        assert sorted(records) == list(range(json.load(f)["d_sae"]))
    live = [r for r in records.values() if not r["dead"]]
    assert live and all(r["contexts"] and r["top_tokens"] and r["description"] for r in live)
    assert all(r["description"].startswith("dead") for r in records.values() if r["dead"])
    latents_page = open(os.path.join(run_dir, "latents.html"), encoding="utf-8").read()
    assert latents_page.count('<section class="card"') == len(live)

    concepts_page = open(os.path.join(run_dir, "concepts.html"), encoding="utf-8").read()
    assert "teacher labels" in concepts_page and "Gallop apace" in concepts_page
    shown = {int(i) for i in re.findall(r"<small>(\d+)</small>", concepts_page)}  # ids shown with a description
    assert shown and all(html.escape(records[i]["description"]) in concepts_page for i in shown)
    # Every concept id links to its place on latents.html: a card for a live latent, the dead list's anchor else.
    linked = {int(i) for i in re.findall(r'<a href="latents.html#latent-(\d+)">', concepts_page)}
    assert linked == shown, (linked, shown)
    assert all(f'id="latent-{i}"' in latents_page for i in linked)

    with open(os.path.join(run_dir, "steering.json"), encoding="utf-8") as f:
        steering = json.load(f)
    assert steering["description"] == records[steering["concept"]]["description"]
    assert [row["scale"] for row in steering["continuations"]] == [-10, -5, 0, 1, 5, 10]
    assert f"concept {steering['concept']}: {steering['description']}" in stdout  # printed at the end
    report = open(os.path.join(run_dir, "results.md"), encoding="utf-8").read()
    assert "[latents.html](latents.html)" in report and "[concepts.html](concepts.html)" in report
    assert f"concept {steering['concept']}" in report and "| 10 |" in report


def _tool(name: str, *args: str) -> str:
    """A tool as a user runs it (a fresh process, Python's warnings on): its stdout; stderr must be empty."""
    from tests.helpers.launch import test_env

    env = test_env()
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{name}.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", (name, proc.returncode, proc.stderr[-3000:])
    return proc.stdout


def _concept_table(out: str) -> list:
    """inspect_concepts' rows: (token, [(concept, logit)], teacher labels); every concept is described (the run's
    latents.jsonl describes all), so each entry ends with its [id]."""
    rows = []
    for line in out.splitlines():
        if re.match(r"^\s*\d+ \| ", line):
            cells = line.split(" | ")
            predicted = [(int(c), float(v)) for c, v in re.findall(r"\[(\d+)\] (-?\d+\.\d+)", cells[2])]
            labels = [int(c) for c in re.findall(r"\[(\d+)\]", cells[3])] if len(cells) > 3 else None
            rows.append((json.loads(cells[1].strip()), predicted, labels))
    return rows


def test_tools_after_the_pipeline(pipeline, tmp_path):
    """docs/pipeline.md's next steps on the run's own files: an export of the CoCoMix student, generate from the
    checkpoint and the export (the same greedy text), inspect_concepts with the teacher's labels and the run's
    latent descriptions (the same table from both), steer (scale 1 is the unsteered greedy text), evaluate (the
    checkpoint and its export score alike, as the pipeline's own evaluation did)."""
    run_dir, _, _ = pipeline
    checkpoint = os.path.join(_students(run_dir), "cocomix", "checkpoints")
    export = str(tmp_path / "cocomix_hf")
    _tool("convert_to_hf", "--load", checkpoint, "--output", export)
    prompt = "ROMEO\nBut soft, what light"
    generated = [_tool("generate", source, path, "--prompt", prompt, "--max-new-tokens", "12", "--greedy")
                 for source, path in (("--load", checkpoint), ("--hf-model", export))]
    assert generated[0] == generated[1] and generated[0].startswith(prompt) and len(generated[0]) > len(prompt)

    teacher = ["--teacher-model", os.path.join(run_dir, "teacher", "hf"), "--teacher-layer", "1",
               "--sae", os.path.join(run_dir, "sae", "final"), "--latent-descriptions",
               os.path.join(run_dir, "latents.jsonl")]
    text = "JULIET\nO Romeo, Romeo! wherefore art thou Romeo?"
    tables = [_concept_table(_tool("inspect_concepts", source, path, "--text", text, *teacher))
              for source, path in (("--load", checkpoint), ("--hf-model", export))]
    assert len(tables[0]) > 10 and all(labels is not None for _, _, labels in tables[0])
    for (token, predicted, labels), (token_hf, predicted_hf, labels_hf) in zip(*tables):
        assert (token, [c for c, _ in predicted], labels) == (token_hf, [c for c, _ in predicted_hf], labels_hf)
        assert all(abs(a - b) <= 2e-3 for (_, a), (_, b) in zip(predicted, predicted_hf))

    steered = _tool("steer", "--hf-model", export, "--prompt", prompt, "--concept", "top", "--scales", "1,-10",
                    "--max-new-tokens", "12", "--latent-descriptions", os.path.join(run_dir, "latents.jsonl"))
    rows = [line.split(" | ", 1)[1] for line in steered.splitlines() if " | " in line]
    assert len(rows) == 2 and prompt + eval(rows[0]) + "\n" == generated[1], (rows, generated[1])
    concept = int(re.search(r"^concept (\d+): ", steered, re.M).group(1))
    assert _descriptions(run_dir)[concept]["description"] in steered

    table = _tool("evaluate", "--load", checkpoint, "--hf-model", export, "--name", "ckpt", "export",
                  "--data-path", os.path.join(run_dir, "data", "shakespeare_text_document"), "--split", "90,5,5",
                  "--eval-split", "test", "--max-documents", "6", "--output-json", str(tmp_path / "eval.json"),
                  "--no-progress")
    assert "| ckpt |" in table and "| export |" in table
    with open(tmp_path / "eval.json") as f:
        ppl = {row["name"]: row["ppl"] for row in json.load(f)["models"]}
    assert ppl["ckpt"] == pytest.approx(ppl["export"], rel=1e-4)
    assert ppl["ckpt"] == pytest.approx(_results(run_dir)["cocomix"]["ppl"], rel=1e-6)


def test_results_report_tokens_saved(pipeline):
    """CoCoMix's and KD's tokens saved against NTP, from the students' validation curves (4 evaluations each): in
    the results table and its printout, and as the CSV's 'tokens saved vs ntp' rows."""
    run_dir, stdout, _ = pipeline
    from megatron_cocomix.evaluation import curves

    found = {name: curves.read_curve(os.path.join(_students(run_dir), name, "tensorboard"), name)
             for name in ("ntp", "cocomix", "kd")}
    assert {len(curve) for curve in found.values()} == {4}
    comparisons = curves.compare("ntp", found)
    expected = curves.summary_lines(comparisons)
    assert [c.candidate for c in comparisons] == ["cocomix", "kd"] and len(expected) == 3
    with open(os.path.join(run_dir, "results.md")) as f:
        assert "\n" + "\n".join(expected) + "\n" in f.read()
    assert "\n" + "\n".join(expected) + "\n" in stdout
    with open(os.path.join(run_dir, "seed1234", "curves.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "tokens saved vs ntp"]
    assert {r["run"]: float(r["value"]) for r in rows} == pytest.approx({c.candidate: c.saving for c in comparisons})


# ---------------------------------------------------------------------------------------- re-runs with other knobs
# These run last: they rewrite the run's results.md for two seeds.

@pytest.fixture(scope="module")
def two_seeds(pipeline):
    """(run dir, stdout) of the same run re-run with SEEDS=1234,4321."""
    run_dir = pipeline[0]
    rerun = subprocess.run(["bash", PIPELINE], cwd=ROOT, env=_environment(run_dir, SEEDS="1234,4321"),
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    return run_dir, rerun.stdout


def test_another_seed_keeps_the_teacher_and_sae_and_runs_its_own_students(two_seeds):
    run_dir, stdout = two_seeds
    done = re.findall(r"^\[pipeline\] \d+/14 (\S+): already done", stdout, re.M)
    ran = re.findall(r"^\[pipeline\] \d+/14 (\S+): done in", stdout, re.M)
    assert done == list(STAGES[:-1]) + ["concepts"], stdout
    assert ran == [f"{stage}.seed4321" for stage in SEED_STAGES], stdout
    assert "other knobs" not in stdout
    # The second seed trained on other samples: other labels, other losses.
    first, second = _results(run_dir, 1234), _results(run_dir, 4321)
    assert first["cocomix"]["tokens_seen"] == second["cocomix"]["tokens_seen"]
    assert first["cocomix"]["ppl"] != second["cocomix"]["ppl"]


def test_seeds_summary_mean_and_spread(two_seeds):
    """The table's mean and sample standard deviation per model, against a computation from the per-seed
    results.json files."""
    run_dir, stdout = two_seeds
    per_seed = {seed: _results(run_dir, seed) for seed in (1234, 4321)}
    report = open(os.path.join(run_dir, "results.md"), encoding="utf-8").read()
    with open(os.path.join(run_dir, "results.json")) as f:
        summary = json.load(f)
    assert summary["seeds"] == [1234, 4321]
    teacher = per_seed[1234]["teacher"]  # the same teacher for both seeds: one number, no spread
    assert per_seed[4321]["teacher"]["ppl"] == teacher["ppl"] and summary["models"]["teacher"]["ppl_sd"] == 0
    assert f"| teacher | {_count(teacher['parameters'])} | - | {teacher['ppl']:.2f} | " in report
    for name in ("cocomix", "ntp", "kd"):
        ppl = [per_seed[seed][name]["ppl"] for seed in (1234, 4321)]
        mean = (ppl[0] + ppl[1]) / 2
        sd = abs(ppl[0] - ppl[1]) / math.sqrt(2)  # n - 1 = 1
        assert summary["models"][name]["ppl"] == pytest.approx(mean, rel=1e-12)
        assert summary["models"][name]["ppl_sd"] == pytest.approx(sd, rel=1e-12)
        row = f"| {name} | {ppl[0]:.2f} | {ppl[1]:.2f} | {mean:.2f} | {sd:.2f} |"
        assert row in report, (row, report)
        bpb = [per_seed[seed][name]["bits_per_byte"] for seed in (1234, 4321)]
        assert f"| {sum(bpb) / 2:.4f} ± {abs(bpb[0] - bpb[1]) / math.sqrt(2):.4f} |" in report
    order = sorted(("cocomix", "ntp", "kd"), key=lambda n: summary["models"][n]["ppl"])
    assert f"best first (mean ± sample standard deviation over 2 seeds): {order[0]} " in report
    assert report in stdout


def _count(n: int) -> str:
    from megatron_cocomix.evaluation.lm import format_count

    return format_count(n)


def test_same_knobs_skip_everything_and_changed_knobs_redo_the_stage(two_seeds):
    run_dir, _ = two_seeds
    env = _environment(run_dir, SEEDS="1234,4321")
    again = subprocess.run(["bash", PIPELINE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(re.findall(r"^\[pipeline\] \d+/14 \S+: already done", again.stdout, re.M)) == 14, again.stdout

    # The concepts stage recorded as made with another number of description tokens: redone, the old pages kept.
    marker = os.path.join(run_dir, "stages", "concepts.done")
    recorded = open(marker).read()
    assert "concepts.tokens=4096" in recorded
    with open(marker, "w") as f:
        f.write(recorded.replace("concepts.tokens=4096", "concepts.tokens=2048"))
    old_page = open(os.path.join(run_dir, "latents.html"), encoding="utf-8").read()
    redo = subprocess.run(["bash", PIPELINE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert redo.returncode == 0, redo.stdout[-3000:] + redo.stderr[-3000:]
    assert len(re.findall(r"^\[pipeline\] \d+/14 \S+: already done", redo.stdout, re.M)) == 13, redo.stdout
    line = next(x for x in redo.stdout.splitlines() if x.startswith("[pipeline] 14/14 concepts: made with other"))
    assert "(concepts.tokens=2048 -> concepts.tokens=4096)" in line, line
    kept = re.search(r"the previous outputs are in (\S+)/$", line).group(1)
    assert open(os.path.join(ROOT, kept, "latents.html"), encoding="utf-8").read() == old_page
    assert os.path.isfile(os.path.join(ROOT, kept, "stages", "concepts.done"))
    assert "concepts.tokens=4096" in open(marker).read()
    assert os.path.getsize(os.path.join(run_dir, "latents.html")) > 0
