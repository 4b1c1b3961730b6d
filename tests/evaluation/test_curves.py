"""Tokens saved at equal validation perplexity (megatron_cocomix/evaluation/curves.py, tools/plot_runs.py
--reference).

- Synthetic curves against numbers worked out by hand: the crossing interpolated linearly in log tokens, the
  candidate ahead (the saving), behind ("not reached", the extra tokens it needs), trained for fewer tokens, a
  crossing at a first evaluation (a bound), the first crossing of a curve that goes up again, a target never
  reached, and curves of fewer than three evaluations refused.
- Two real tiny training runs (different batch sizes, evaluation points at different tokens) written to
  tensorboard by the trainer: the comparison in both directions equals one computed here from the event files
  read back with tensorboard's EventAccumulator, and tools/plot_runs.py --reference prints, writes and marks it.
"""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from megatron_cocomix.evaluation import curves
from tests.helpers.launch import MULTI_RUN_WORKER, TINY_GPT, run_script

REFERENCE = [(1000.0, 100.0), (2000.0, 60.0), (4000.0, 40.0), (8000.0, 30.0)]


def test_candidate_ahead_interpolated_in_log_tokens():
    candidate = [(1000.0, 90.0), (2000.0, 50.0), (4000.0, 35.0), (8000.0, 25.0)]
    result = curves.tokens_saved("ntp", REFERENCE, "cocomix", candidate)
    # NTP's final 30 lies half-way from 35 to 25, between 4000 and 8000 tokens: half-way in log tokens.
    crossing = 4000.0 * 2 ** 0.5
    assert result.reached and not result.bound and result.target_ppl == 30.0
    assert result.candidate_tokens == pytest.approx(crossing, rel=1e-12)
    assert result.reference_tokens == 8000.0
    assert result.saving == pytest.approx(1 - crossing / 8000.0, rel=1e-12)  # 29.3%
    assert result.sentence() == ("cocomix reaches ntp's final validation perplexity 30.00 at 5.66K tokens: 29.3% "
                                 "fewer tokens than ntp (8.00K).")


def test_candidate_behind_the_other_direction():
    candidate = [(1000.0, 120.0), (2000.0, 80.0), (4000.0, 55.0), (8000.0, 45.0)]
    result = curves.tokens_saved("ntp", REFERENCE, "kd", candidate)
    # kd never gets to 30 (not reached); NTP reached kd's final 45 three quarters of the way from 60 to 40.
    crossing = 2000.0 * 2 ** 0.75
    assert not result.reached and not result.bound and result.target_ppl == 45.0
    assert result.reference_tokens == pytest.approx(crossing, rel=1e-12)
    assert result.candidate_tokens == 8000.0
    extra = 8000.0 / crossing - 1  # 137.8% more
    assert result.saving == pytest.approx(-extra, rel=1e-12)
    assert result.sentence() == ("kd does not reach ntp's final validation perplexity 30.00 (not reached; its own: "
                                 "45.00 at 8.00K tokens); ntp reached 45.00 at 3.36K tokens: kd needs 137.8% more "
                                 "tokens.")


def test_shorter_candidate_ahead_at_equal_tokens():
    """Trained for half the tokens, the candidate cannot reach NTP's final 30, yet NTP needed more tokens than
    the candidate for the candidate's final 38."""
    candidate = [(1000.0, 90.0), (2000.0, 55.0), (4000.0, 38.0)]
    result = curves.tokens_saved("ntp", REFERENCE, "short", candidate)
    crossing = 4000.0 * 2 ** 0.2  # 38 is a fifth of the way from 40 to 30
    assert not result.reached and result.reference_tokens == pytest.approx(crossing, rel=1e-12)
    assert result.saving == pytest.approx(1 - 4000.0 / crossing, rel=1e-12)
    assert result.sentence().endswith(f"short needs {100 * (1 - 4000.0 / crossing):.1f}% fewer tokens.")


def test_crossing_at_a_first_evaluation_is_a_bound():
    candidate = [(1000.0, 28.0), (2000.0, 20.0), (4000.0, 15.0)]  # below NTP's final already at 1000 tokens
    result = curves.tokens_saved("ntp", REFERENCE, "big", candidate)
    assert result.reached and result.bound and result.candidate_tokens == 1000.0
    assert "at least 87.5% fewer tokens" in result.sentence() and "by its first evaluation" in result.sentence()
    behind = [(1000.0, 300.0), (2000.0, 200.0), (4000.0, 150.0)]  # NTP's first evaluation already beats 150
    result = curves.tokens_saved("ntp", REFERENCE, "tiny", behind)
    assert not result.reached and result.bound and result.reference_tokens == 1000.0
    assert result.sentence().endswith("tiny needs at least 300.0% more tokens.")


def test_first_crossing_and_not_reached():
    bumpy = [(1.0, 50.0), (2.0, 30.0), (4.0, 35.0), (8.0, 25.0)]
    tokens, bound = curves.tokens_to_reach(bumpy, 32.0)  # (50 - 32) / (50 - 30) = 0.9 of the way from 1 to 2
    assert tokens == pytest.approx(2 ** 0.9, rel=1e-12) and not bound
    assert curves.tokens_to_reach(bumpy, 30.0) == (2.0, False)  # an evaluation exactly at the target
    assert curves.tokens_to_reach(bumpy, 24.9) is None


def test_fewer_than_three_evaluations_refused():
    scalars = {"tokens": {i: 512.0 * i for i in range(1, 9)}, "lm loss validation ppl": {4: 80.0, 8: 60.0, 9: 50.0}}
    with pytest.raises(ValueError) as error:
        curves.validation_curve(scalars, "ntp")  # iteration 9 has no tokens value: two evaluations
    assert str(error.value).startswith("ntp: 2 evaluations of 'lm loss validation ppl' with a 'tokens' value; "
                                       "tokens saved needs at least 3")
    scalars["lm loss validation ppl"][2] = 90.0
    assert curves.validation_curve(scalars, "ntp") == [(1024.0, 90.0), (2048.0, 80.0), (4096.0, 60.0)]
    with pytest.raises(ValueError, match="^kd: 2 evaluations; tokens saved needs at least 3$"):
        curves.tokens_saved("ntp", REFERENCE, "kd", [(1000.0, 90.0), (2000.0, 50.0)])


# ------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs in one launch, validating 16 samples each time: 'big' (16 sequences of 32 tokens a step,
    6 steps, validation every 2) and 'small' (8 a step, lr 3e-3, 12 steps, every 3): evaluations at 1024, 2048,
    3072 tokens and at 768, 1536, 2304, 3072. Returns {name: tensorboard dir}."""
    root = tmp_path_factory.mktemp("curves")
    settings = {"big": ["--global-batch-size", "16", "--train-iters", "6", "--eval-interval", "2",
                        "--eval-iters", "1"],
                "small": ["--global-batch-size", "8", "--train-iters", "12", "--eval-interval", "3",
                          "--eval-iters", "2", "--lr", "3e-3"]}
    runs, out = [], {}
    for name, flags in settings.items():
        out[name] = str(root / name / "tensorboard")
        runs.append([name, "pretrain", TINY_GPT + flags + ["--tensorboard-dir", out[name]]])
    with open(root / "spec.json", "w") as f:
        json.dump(runs, f)
    run_script(MULTI_RUN_WORKER, [str(root / "spec.json"), str(root / "summary.json")], nproc=1, timeout=600)
    return out


def _points(tensorboard_dir: str) -> list:
    """(tokens, validation ppl) at each evaluation, read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard_dir)
    events.Reload()
    tokens = {e.step: e.value for e in events.Scalars("tokens")}
    return [(tokens[e.step], e.value) for e in events.Scalars("lm loss validation ppl")]


def _first_reach(points: list, target: float) -> float:
    """Worked out as docs/tokens_saved.md says: the first evaluation at or below the target, and the tokens
    where the straight line from the evaluation before it in (log tokens, ppl) meets the target."""
    index = next(i for i, (_, ppl) in enumerate(points) if ppl <= target)
    assert index > 0, "a crossing at the first evaluation: the tiny runs no longer test the interpolation"
    (t0, p0), (t1, p1) = points[index - 1], points[index]
    return t0 * (t1 / t0) ** ((p0 - target) / (p0 - p1))


def test_real_runs_against_event_files(two_runs, tmp_path, capsys):
    from tools import plot_runs

    points = {name: _points(path) for name, path in two_runs.items()}
    assert [t for t, _ in points["big"]] == [1024, 2048, 3072] and [t for t, _ in points["small"]] == [768, 1536,
                                                                                                       2304, 3072]
    finals = {name: p[-1][1] for name, p in points.items()}
    assert finals["big"] != finals["small"], finals
    ahead, behind = sorted(points, key=lambda name: finals[name])
    # Either run as the reference: the one behind reaches nothing, the one ahead reaches the other's final.
    expected = {(behind, ahead): 1 - _first_reach(points[ahead], finals[behind]) / points[behind][-1][0],
                (ahead, behind): 1 - points[behind][-1][0] / _first_reach(points[ahead], finals[behind])}
    for (reference, candidate), saving in expected.items():
        result = curves.tokens_saved(reference, curves.read_curve(two_runs[reference]), candidate,
                                     curves.read_curve(two_runs[candidate]))
        assert result.reached == (candidate == ahead) and not result.bound
        assert result.target_ppl == pytest.approx(finals[behind], rel=1e-12)
        assert result.saving == pytest.approx(saving, rel=1e-9, abs=1e-12), (reference, result)
        assert (result.saving > 0) == (candidate == ahead)

        output = tmp_path / f"vs_{reference}.png"
        md = tmp_path / f"vs_{reference}.md"
        assert plot_runs.main([two_runs["big"], two_runs["small"], "--name", "big", "small", "--reference", reference,
                               "--output", str(output), "--output-md", str(md)]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert printed[:2] == md.read_text().splitlines() == curves.summary_lines([result])
        assert printed[1].startswith(f"- {candidate} reaches" if candidate == ahead else f"- {candidate} does not")
        assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        row, = [r for r in csv.DictReader(open(tmp_path / f"vs_{reference}.csv"))
                if r["metric"] == f"tokens saved vs {reference}"]
        assert row["run"] == candidate and float(row["value"]) == pytest.approx(saving, rel=1e-9, abs=1e-12)
        assert math.isclose(float(row["x"]), result.candidate_tokens, rel_tol=1e-9)


def test_plot_runs_reference_bad_input(two_runs, tmp_path, capsys):
    from tools import plot_runs

    output = str(tmp_path / "c.png")
    for argv, message in [
        (["--reference", "ntp"], "error: --reference ntp: not one of the runs (big, small)"),
        (["--output-md", str(tmp_path / "s.md")], "error: --output-md holds the tokens-saved lines: give --reference"),
        (["--name", "tb", "tb", "--reference", "tb"], "error: --reference: the runs' labels (tb, tb) must differ"),
    ]:
        names = [] if "--name" in argv else ["--name", "big", "small"]
        assert plot_runs.main([two_runs["big"], two_runs["small"], *names, "--output", output, *argv]) == 2
        assert capsys.readouterr().err.strip().startswith(message)
    assert not os.path.exists(output)
