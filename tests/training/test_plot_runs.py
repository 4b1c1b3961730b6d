"""tools/plot_runs.py on tensorboard event files written here: the curves it reads, the CSV, the PNG, bad input."""

import csv
import math

import pytest
from torch.utils.tensorboard import SummaryWriter

from tools import plot_runs


def write_run(folder, concept: bool, batch_tokens: int, offset: float):
    """A run as the trainer writes it: 'tokens' per iteration, train losses every iteration, validation every 2."""
    writer = SummaryWriter(log_dir=str(folder))
    for it in range(1, 7):
        writer.add_scalar("tokens", it * batch_tokens, it)
        writer.add_scalar("lm loss", 10.0 - it + offset, it)
        if concept:
            writer.add_scalar("concept loss", 5.0 - 0.5 * it, it)
        if it % 2 == 0:
            writer.add_scalar("lm loss validation", 9.0 - it + offset, it)
            writer.add_scalar("lm loss validation ppl", math.exp(9.0 - it + offset), it)
    writer.close()


def test_plot_runs_writes_curves_against_tokens(tmp_path, capsys):
    write_run(tmp_path / "cocomix" / "tb", concept=True, batch_tokens=256, offset=0.0)
    write_run(tmp_path / "ntp", concept=False, batch_tokens=512, offset=0.5)
    output = tmp_path / "curves.png"
    assert plot_runs.main([str(tmp_path / "cocomix"), str(tmp_path / "ntp"), "--output", str(output)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 10_000
    rows = list(csv.DictReader(open(tmp_path / "curves.csv")))
    runs = {r["run"] for r in rows}
    assert runs == {"cocomix/tb", "ntp"}
    lm = {(r["run"], float(r["x"])): float(r["value"]) for r in rows if r["metric"] == "lm loss"}
    assert lm[("cocomix/tb", 3 * 256)] == pytest.approx(7.0) and lm[("ntp", 3 * 512)] == pytest.approx(7.5)
    ppl = [r for r in rows if r["metric"] == "lm loss validation ppl" and r["run"] == "ntp"]
    assert [float(r["x"]) for r in ppl] == [1024.0, 2048.0, 3072.0] and {r["x_name"] for r in ppl} == {"tokens"}
    assert {r["metric"] for r in rows if r["run"] == "ntp"} == {"lm loss", "lm loss validation ppl"}
    assert len([r for r in rows if r["metric"] == "concept loss"]) == 6

    # --name labels each RUN_DIR (a --tensorboard-dir holding the event files itself, here).
    assert plot_runs.main([str(tmp_path / "cocomix" / "tb"), str(tmp_path / "ntp"), "--name", "CoCoMix", "NTP",
                           "--output", str(output)]) == 0
    assert {r["run"] for r in csv.DictReader(open(tmp_path / "curves.csv"))} == {"CoCoMix", "NTP"}


def test_plot_runs_bad_input(tmp_path, capsys):
    assert plot_runs.main([str(tmp_path / "missing"), "--output", str(tmp_path / "c.png")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: no such directory"
    (tmp_path / "empty").mkdir()
    assert plot_runs.main([str(tmp_path / "empty"), "--output", str(tmp_path / "c.png")]) == 2
    assert "no tensorboard event files" in capsys.readouterr().err
    assert plot_runs.main([str(tmp_path / "empty"), "--name", "a", "b", "--output", str(tmp_path / "c.png")]) == 2
    assert capsys.readouterr().err.strip() == "error: --name: 2 names for 1 run directories"


def test_plot_runs_reference_needs_three_validations(tmp_path, capsys):
    """--reference on a run that validated twice: one error line naming it; without --reference it plots."""
    write_run(tmp_path / "ntp", concept=False, batch_tokens=512, offset=0.5)  # validations at iterations 2, 4, 6
    writer = SummaryWriter(log_dir=str(tmp_path / "short"))
    for it in range(1, 5):
        writer.add_scalar("tokens", it * 512, it)
        if it % 2 == 0:
            writer.add_scalar("lm loss validation ppl", 100.0 / it, it)
    writer.close()
    runs = [str(tmp_path / "ntp"), str(tmp_path / "short"), "--output", str(tmp_path / "c.png")]
    assert plot_runs.main(runs + ["--reference", "ntp"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: short: 2 evaluations of 'lm loss validation ppl' with a 'tokens' value; tokens saved needs at least 3 "
        "(a smaller --eval-interval validates more often)")
    assert plot_runs.main(runs) == 0
