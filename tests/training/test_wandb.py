"""Weights & Biases beside tensorboard: an offline run (pp2_run, tests/training/conftest.py) holds the very scalars
tensorboard holds, read back from its run file; the flags' defaults as Megatron-LM's; without the wandb package a
run trains as long as it is not asked for, and is refused with one line when it is."""

import os
import subprocess
import sys

import pytest

import pretrain_cocomix
from megatron_cocomix.arguments import parse_args
from megatron_cocomix.training.scalar_writers import SAMPLES_KEY, WandbWriter, wandb_init_kwargs
from tests.helpers.launch import PRETRAIN_WORKER, TINY_GPT, test_env
from tests.helpers.paths import ROOT
from tests.helpers.run_logs import tensorboard_scalars, wandb_history, wandb_records, wandb_run_files

WANDB_FLAGS = ["--wandb-project", "p", "--wandb-exp-name", "e"]


def test_offline_run_holds_the_tensorboard_scalars(pp2_run):
    result, args, tensorboard_dir, wandb_dir = pp2_run
    files = wandb_run_files(wandb_dir)
    assert len(files) == 1, files  # the last rank's run only
    records = wandb_records(files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("cocomix-tests", "tiny-pp2")
    config = {item.key: item.value_json for item in run.config.update}
    assert config["pipeline_model_parallel_size"] == "2" and config["global_batch_size"] == "8"

    rows = wandb_history(records)
    assert [row["_step"] for row in rows] == [1, 2, 3, 4]
    assert [row[SAMPLES_KEY] for row in rows] == [8, 16, 24, 32]
    logged: dict = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("_") or key == SAMPLES_KEY:
                continue
            # A "vs samples" curve is logged at its iteration, its x axis being the row's consumed samples.
            step = row[SAMPLES_KEY] if key.endswith(" vs samples") else row["_step"]
            logged.setdefault(key, {})[step] = value
    expected = tensorboard_scalars(tensorboard_dir)
    assert set(logged) == set(expected)
    for tag, values in expected.items():
        assert sorted(logged[tag]) == sorted(values), tag
        # Tensorboard stores float32; W&B keeps the logger's float64.
        assert [logged[tag][s] for s in sorted(values)] == pytest.approx([values[s] for s in sorted(values)],
                                                                           rel=1e-6), tag
    # And both are the trainer's own numbers.
    history = result["train_history"]
    assert [logged["lm loss"][e["iteration"]] for e in history] == [e["lm loss"] for e in history]
    assert logged["lm loss validation"][4] == result["valid"]["lm loss"]
    step_metrics = {r.metric.name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert step_metrics == {tag: SAMPLES_KEY for tag in expected if tag.endswith(" vs samples")}


def test_flags_follow_megatron(tmp_path):
    args = parse_args(TINY_GPT + WANDB_FLAGS + ["--save", str(tmp_path / "ckpt")], world_size=1)
    assert args.wandb_save_dir == str(tmp_path / "ckpt" / "wandb")  # Megatron-LM's default: <--save>/wandb
    kwargs = wandb_init_kwargs(args)
    assert (kwargs["dir"], kwargs["name"], kwargs["project"]) == (args.wandb_save_dir, "e", "p")
    assert "mode" not in kwargs and "entity" not in kwargs  # WANDB_MODE / W&B's settings decide, as in Megatron
    assert kwargs["config"]["num_layers"] == 4 and "_frozen" not in kwargs["config"]
    args = parse_args(TINY_GPT + WANDB_FLAGS + ["--wandb-save-dir", str(tmp_path), "--wandb-mode", "offline",
                                                "--wandb-entity", "team"], world_size=1)
    assert wandb_init_kwargs(args)["mode"] == "offline" and wandb_init_kwargs(args)["entity"] == "team"


def test_failed_init_is_one_line(tmp_path, monkeypatch):
    """No API key, or no network in online mode (after wandb's init timeout): one line with the way out."""
    import wandb

    def init(**kwargs):
        raise wandb.errors.CommError("Timed out initializing run: POST https://api.wandb.ai/graphql\nmore detail")

    monkeypatch.setattr(wandb, "init", init)
    args = parse_args(TINY_GPT + WANDB_FLAGS + ["--wandb-save-dir", str(tmp_path)], world_size=1)
    with pytest.raises(ValueError) as error:
        WandbWriter(args)
    assert str(error.value) == ("--wandb-project p: wandb.init failed: Timed out initializing run: POST "
                                "https://api.wandb.ai/graphql (without network use --wandb-mode offline or "
                                "WANDB_MODE=offline, then `wandb sync`)")


def test_without_wandb_installed_the_flag_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    with pytest.raises(SystemExit) as exit_:
        pretrain_cocomix.main(TINY_GPT + WANDB_FLAGS + ["--wandb-save-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --wandb-project needs the wandb package: pip install wandb==0.30.0"]


def test_without_wandb_installed_training_runs(tmp_path):
    """No module on the training path imports wandb unless --wandb-project asks for it."""
    summary = str(tmp_path / "summary.json")
    flags = TINY_GPT + ["--train-iters", "2", "--eval-iters", "0", "--tensorboard-dir", str(tmp_path / "tb")]
    code = ("import runpy, sys; sys.modules['wandb'] = None; "
            f"sys.argv = {[PRETRAIN_WORKER, summary, *flags]!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=test_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(tensorboard_scalars(str(tmp_path / "tb"))["lm loss"]) == [1, 2]
    assert os.path.exists(summary)
