"""Runs that stop on purpose, and how they resume: preemption signals, a wall-time budget, divergence, kill -9.

Every resumed run is compared with one uninterrupted run of the same flags: the same losses, bit for bit (the
same layout, so the same reduction order)."""

import os
import random
import re
import signal
import subprocess
import time

import pytest

from tests.helpers.launch import PRETRAIN_WORKER, TINY_GPT, losses, run_pretrain, run_script, start_script
from tests.helpers.paths import ROOT

PRETRAIN = os.path.join(ROOT, "pretrain_cocomix.py")
ITERATION = re.compile(r"\] iteration\s+(\d+)/")
LM_LOSS = re.compile(r"\] iteration\s+(\d+)/.*\| lm loss: (\S+) \|")


def flags(**overrides) -> list:
    """TINY_GPT with some values replaced; long enough to be interrupted, no validation, a line per iteration."""
    values = {"--train-iters": "200", "--eval-iters": "0", "--log-interval": "1", **overrides}
    out, skip = [], False
    for i, token in enumerate(TINY_GPT):
        if skip:
            skip = False
            continue
        if token in values:
            out += [token, values.pop(token)]
            skip = True
        else:
            out.append(token)
    for key, value in values.items():
        out += [key] if value is None else [key, value]
    return out


def tracker(directory) -> int:
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt")) as f:
        return int(f.read())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """20 uninterrupted iterations on 2 ranks (of a 200-iteration schedule)."""
    tmp = tmp_path_factory.mktemp("reference")
    return losses(run_pretrain(flags(**{"--exit-interval": "20"}), tmp, nproc=2))


def _wait_for_iteration(proc, at_least: int, timeout: float = 240) -> str:
    seen, deadline = "", time.time() + timeout
    for line in proc.stdout:
        seen += line
        match = ITERATION.search(line)
        if match and int(match.group(1)) >= at_least:
            return seen
        assert time.time() < deadline, seen[-2000:]
    raise AssertionError(f"the run ended before iteration {at_least}:\n{seen[-3000:]}")


def _resume_and_compare(directory, stopped_at, reference, tmp):
    resumed = run_pretrain(flags(**{"--load": str(directory), "--save": str(directory), "--exit-interval": "20"}),
                           tmp, nproc=2, name="resumed")
    assert [e["iteration"] for e in resumed["train_history"]] == list(range(stopped_at + 1, 21))
    assert losses(resumed) == reference[stopped_at:20]


def test_sigterm_saves_at_the_current_iteration_and_resumes_exactly(tmp_path, reference):
    """SIGTERM to the two ranks of a torchrun job: both finish the iteration, save one checkpoint, exit 0."""
    ckpt = tmp_path / "ckpt"
    summary = tmp_path / "signalled.json"
    proc = start_script(PRETRAIN_WORKER, [str(summary)] + flags(**{"--save": str(ckpt), "--exit-signal-handler": None}),
                        nproc=2, stderr_path=str(tmp_path / "stderr.txt"))
    try:
        seen = _wait_for_iteration(proc, 3)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(int(pid), signal.SIGTERM)
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    stopped = re.search(r"exiting program at iteration (\d+) after receiving SIGTERM", seen + rest)
    assert stopped, (seen + rest)[-2000:]
    stopped_at = int(stopped.group(1))
    assert 3 <= stopped_at < 18 and tracker(ckpt) == stopped_at
    assert [d for d in os.listdir(ckpt) if d.startswith("iter_")] == [f"iter_{stopped_at:07d}"]  # one checkpoint
    _resume_and_compare(ckpt, stopped_at, reference, tmp_path)


def test_exit_duration_saves_and_resumes_exactly(tmp_path, reference):
    ckpt = tmp_path / "ckpt"
    run = run_pretrain(flags(**{"--save": str(ckpt), "--exit-duration-in-mins": "0.0001"}), tmp_path, nproc=2)
    assert "exiting program at iteration 1 after 0.0001 minutes of wall time" in run["stdout"]
    assert run["iteration"] == 1 and tracker(ckpt) == 1
    assert losses(run) == reference[:1]
    _resume_and_compare(ckpt, 1, reference, tmp_path)


def test_divergence_stops_with_one_line_before_the_step(tmp_path):
    """An absurd learning rate: iteration 1's update sends the weights to ~1e30 and iteration 2's loss is NaN."""
    ckpt = tmp_path / "ckpt"
    diverging = flags(**{"--train-iters": "6", "--lr": "1e30", "--lr-decay-style": "constant",
                         "--lr-warmup-iters": "0", "--min-lr": "0", "--save": str(ckpt), "--save-interval": "1"})
    proc = run_script(PRETRAIN, diverging, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: iteration 2: rank 0: lm loss is nan"), proc.stderr[-2000:]
    assert "the last checkpoint (iteration 1) is clean" in errors[0]
    assert "Traceback" not in proc.stderr
    assert tracker(ckpt) == 1 and sorted(os.listdir(ckpt)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    # That checkpoint loads.
    loaded = run_script(PRETRAIN, diverging + ["--load", str(ckpt), "--skip-train"], check=False)
    assert loaded.returncode == 0 and "loaded checkpoint" in loaded.stdout, loaded.stderr[-2000:]
    # Without the check the same run trains on through NaN.
    unchecked = run_script(PRETRAIN, flags(**{"--train-iters": "3", "--lr": "1e30", "--lr-decay-style": "constant",
                                              "--lr-warmup-iters": "0", "--min-lr": "0"})
                           + ["--no-check-for-nan-in-loss-and-grad"], check=False)
    assert unchecked.returncode == 0 and "number of nan iterations:   1" in unchecked.stdout


def _printed_losses(stdout: str) -> dict:
    return {int(i): value for i, value in LM_LOSS.findall(stdout)}


@pytest.mark.slow
def test_kill_9_three_times_then_resume_matches_uninterrupted(tmp_path):
    """A run that saves every iteration is killed with SIGKILL at random moments (during a step or a save),
    three times in a row; each restart resumes from the last complete checkpoint. Every loss any segment printed
    equals the uninterrupted run's, digit for digit, and the final run completes."""
    run_flags = flags(**{"--train-iters": "12", "--save-interval": "1"})
    full = _printed_losses(run_script(PRETRAIN, run_flags).stdout)
    assert sorted(full) == list(range(1, 13))
    ckpt, rng, printed = tmp_path / "ckpt", random.Random(1234), []
    segment_flags = run_flags + ["--save", str(ckpt), "--load", str(ckpt)]
    for segment in range(3):
        start = tracker(ckpt) if os.path.exists(ckpt / "latest_checkpointed_iteration.txt") else 0
        proc = start_script(PRETRAIN, segment_flags)
        try:
            seen = _wait_for_iteration(proc, start + rng.randint(1, 2))
            time.sleep(rng.uniform(0.0, 0.4))  # somewhere in the next step or its save
            os.killpg(proc.pid, signal.SIGKILL)
            rest, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        printed.append(_printed_losses(seen + (rest or "")))
        assert proc.returncode == -signal.SIGKILL
    final = run_script(PRETRAIN, segment_flags)
    printed.append(_printed_losses(final.stdout))
    assert max(printed[-1]) == 12
    for segment in printed:
        assert segment and all(value == full[i] for i, value in segment.items()), (segment, full)


def test_exit_duration_under_the_deepspeed_launcher(tmp_path, reference):
    """The same wall-time exit through `deepspeed --num_gpus 2` with ZeRO-2: DeepSpeed's optimizer files are
    saved with the checkpoint, exit 0, and the resumed run continues with the uninterrupted run's losses."""
    import json

    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    ds = ["--deepspeed", "--deepspeed_config", str(ds_config)]
    ckpt = tmp_path / "ckpt"
    stopped = run_script(PRETRAIN, flags(**{"--save": str(ckpt), "--exit-duration-in-mins": "0.0001"}) + ds,
                         nproc=2, launcher="deepspeed")
    assert "exiting program at iteration 1 after 0.0001 minutes of wall time" in stopped.stdout
    assert tracker(ckpt) == 1 and os.path.isdir(ckpt / "iter_0000001" / "deepspeed_optimizer")
    resumed = run_pretrain(flags(**{"--load": str(ckpt), "--save": str(ckpt), "--exit-interval": "4"}) + ds,
                           tmp_path, nproc=2, launcher="deepspeed")
    assert [e["iteration"] for e in resumed["train_history"]] == [2, 3, 4]
    # ZeRO-2 against megatron's DDP reference: the same maths, summed in another order.
    for got, expected in zip(losses(resumed), reference[1:4]):
        assert abs(got - expected) <= 2e-6 * abs(expected), (losses(resumed), reference[1:4])
