"""Runs that stop on purpose, and how they resume: preemption signals, a wall-time budget, divergence, kill -9.

Every resumed run is compared with one uninterrupted run of the same flags (conftest's `uninterrupted`): the same
losses, bit for bit (the same layout, so the same reduction order).

Preemption is delivered as clusters deliver it, to a 2-rank torchrun job whose ranks each run a data-loader
worker (a forked process with the rank's command line):
- `job`: `pkill -TERM -f` on the script's command line, as Slurm's `--signal` without `B:` and `scancel
  --signal` do: every process of the job, torchrun and the loader workers included;
- `ranks`: the sbatch recipe's pattern (`-u .*<script>`), which still matches the loader workers;
- `torchrun`: torchrun alone, which forwards SIGTERM to each rank's process group (so to the loader workers too)
  and waits for them up to its --shutdown-timeout (30 s) before SIGKILL.
In every case the ranks finish the iteration, save one checkpoint and exit 0; the loader workers ignore the
signal. torchrun exits 0 when only the ranks were signalled, and 1 when it was signalled itself (it re-raises the
signal after shutting the workers down, whatever their exit status).
"""

import json
import os
import random
import re
import signal
import subprocess
import textwrap
import time

import pytest

from tests.helpers.checkpoint_files import tracker
from tests.helpers.interrupted_runs import (
    ITERATION,
    LOADED,
    flags,
    printed_losses,
    read_until,
    wait_for_iteration,
)
from tests.helpers.launch import (
    MULTI_RUN_WORKER,
    PRETRAIN_WORKER,
    losses,
    run_pretrain,
    run_script,
    start_script,
)
from tests.helpers.paths import ROOT

PRETRAIN = os.path.join(ROOT, "pretrain_cocomix.py")
DELIVERIES = ("job", "ranks", "torchrun")


def _deliver_sigterm(proc: subprocess.Popen, how: str, ckpt: str) -> list:
    """Send SIGTERM the way `how` says; returns the pids it went to."""
    script = r"pretrain_worker[.]py .*" + re.escape(ckpt)
    pattern = {"job": script, "ranks": r"-u .*" + script}.get(how)
    if pattern is None:
        os.kill(proc.pid, signal.SIGTERM)
        return [proc.pid]
    pids = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()
    subprocess.run(["pkill", "-TERM", "-f", "--", pattern], check=True)
    return [int(p) for p in pids]


def _signalled_run(tmp, how: str) -> dict:
    ckpt = tmp / f"ckpt_{how}"
    stderr = tmp / f"stderr_{how}.txt"
    proc = start_script(PRETRAIN_WORKER, [str(tmp / f"{how}.json")] + flags(
        **{"--save": str(ckpt), "--exit-signal-handler": None, "--num-workers": "1"}), nproc=2,
        stderr_path=str(stderr))
    try:
        seen = wait_for_iteration(proc, 3)
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        loader_workers = [w for r in ranks for w in subprocess.run(["pgrep", "-P", r], capture_output=True,
                                                                   text=True).stdout.split()]
        signalled = _deliver_sigterm(proc, how, str(ckpt))
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"returncode": proc.returncode, "stdout": seen + rest, "stderr": stderr.read_text(), "ckpt": ckpt,
            "ranks": [int(r) for r in ranks], "loader_workers": [int(w) for w in loader_workers],
            "signalled": signalled, "torchrun": proc.pid}


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """The three deliveries of SIGTERM, and a run stopped by --exit-duration-in-mins; then each resumed to
    iteration 20 from its checkpoint, the four in one launch."""
    tmp = tmp_path_factory.mktemp("preempted")
    runs = {how: _signalled_run(tmp, how) for how in DELIVERIES}
    ckpt = tmp / "ckpt_duration"
    runs["duration"] = run_pretrain(flags(**{"--save": str(ckpt), "--exit-duration-in-mins": "0.0001"}), tmp,
                                    nproc=2, name="duration")
    runs["duration"]["ckpt"] = ckpt
    for run in runs.values():  # as the stopped runs left them (the resumed runs below save there too)
        saved = os.path.exists(run["ckpt"] / "latest_checkpointed_iteration.txt")
        run["tracker"] = tracker(run["ckpt"]) if saved else None
        run["checkpoints"] = sorted(d for d in os.listdir(run["ckpt"]) if d.startswith("iter_")) if saved else []
    spec = [[name, "pretrain", flags(**{"--load": str(run["ckpt"]), "--save": str(run["ckpt"]),
                                        "--exit-interval": "20"})] for name, run in runs.items() if run["tracker"]]
    (tmp / "resume.json").write_text(json.dumps(spec))
    run_script(MULTI_RUN_WORKER, [str(tmp / "resume.json"), str(tmp / "resumed.json")], nproc=2, timeout=600)
    resumed = json.loads((tmp / "resumed.json").read_text())
    return {name: dict(run, resumed=resumed.get(name)) for name, run in runs.items()}


def _check_resumed(run: dict, stopped_at: int, uninterrupted) -> None:
    resumed = run["resumed"]
    assert [e["iteration"] for e in resumed["train_history"]] == list(range(stopped_at + 1, 21))
    assert losses(resumed) == uninterrupted[stopped_at:20]


@pytest.mark.parametrize("how", DELIVERIES)
def test_sigterm_saves_at_the_current_iteration_and_resumes_exactly(preempted, uninterrupted, how):
    run = preempted[how]
    assert "DataLoader worker" not in run["stderr"], run["stderr"][-3000:]
    assert len(run["ranks"]) == 2 and len(run["loader_workers"]) == 2
    if how == "job":  # the pattern found every process of the job
        assert sorted(run["signalled"]) == sorted(run["ranks"] + run["loader_workers"] + [run["torchrun"]])
    elif how == "ranks":  # the ranks and, sharing their command line, the loader workers
        assert sorted(run["signalled"]) == sorted(run["ranks"] + run["loader_workers"])
    stopped = re.search(r"exiting program at iteration (\d+) after receiving SIGTERM", run["stdout"])
    assert stopped, run["stdout"][-2000:] + run["stderr"][-2000:]
    stopped_at = int(stopped.group(1))
    assert 3 <= stopped_at < 18 and run["tracker"] == stopped_at
    assert run["checkpoints"] == [f"iter_{stopped_at:07d}"]  # one checkpoint, at the iteration it stopped
    if how == "ranks":
        assert run["returncode"] == 0, run["stderr"][-3000:]
    else:  # torchrun forwarded the signal to the ranks' process groups, waited for them, then re-raised it
        assert "death signal, shutting down workers" in run["stderr"]
        assert run["returncode"] == 1 and "SignalException" in run["stderr"]
        assert "Unable to shutdown process" not in run["stderr"]  # no SIGKILL: the ranks were done in time
    _check_resumed(run, stopped_at, uninterrupted)


def test_exit_duration_saves_and_resumes_exactly(preempted, uninterrupted):
    run = preempted["duration"]
    assert "exiting program at iteration 1 after 0.0001 minutes of wall time" in run["stdout"]
    assert run["iteration"] == 1 and run["tracker"] == 1
    assert losses(run) == uninterrupted[:1]
    _check_resumed(run, 1, uninterrupted)


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


SLOW_SAVE_DRIVER = textwrap.dedent("""
    # pretrain_cocomix.py with every checkpoint write taking 0.3 s longer (before the shards are written), so that
    # a kill aimed at a save lands inside it. The repository root is on PYTHONPATH (start_script's environment).
    import runpy, sys, time
    from megatron_cocomix.training import checkpointing

    real_save = checkpointing.InProcessTorchDistSave.save

    def slow_save(self, sharded_state_dict, checkpoint_dir):
        time.sleep(0.3)
        return real_save(self, sharded_state_dict, checkpoint_dir)

    checkpointing.InProcessTorchDistSave.save = slow_save
    sys.argv = [{script!r}] + sys.argv[1:]
    runpy.run_path({script!r}, run_name="__main__")
""")


def _saves(stdout: str) -> tuple:
    started = [int(i) for i in re.findall(r"^saving checkpoint at iteration\s+(\d+)", stdout, re.M)]
    done = [int(i) for i in re.findall(r"successfully saved checkpoint at iteration\s+(\d+)", stdout)]
    return started, done


@pytest.mark.slow
def test_kill_9_three_times_then_resume_matches_uninterrupted(tmp_path):
    """A run that saves every iteration is killed with SIGKILL three times in a row: at a random moment, right
    after a save began, and at a random moment again. Each restart (the same command, --load = --save) resumes from
    the last complete checkpoint: it loads the iteration the tracker names and its first iteration is the next
    one. At least one kill landed in the middle of a save (it began and never finished), and the tracker then still
    named the previous checkpoint. Every loss any segment printed equals the uninterrupted run's, digit for digit,
    and the final run completes."""
    run_flags = flags(**{"--train-iters": "12", "--save-interval": "1"})
    full = printed_losses(run_script(PRETRAIN, run_flags).stdout)
    assert sorted(full) == list(range(1, 13))
    driver = tmp_path / "slow_save_driver.py"
    driver.write_text(SLOW_SAVE_DRIVER.format(script=PRETRAIN))
    ckpt, rng, segments, killed_in_save = tmp_path / "ckpt", random.Random(1234), [], []
    segment_flags = run_flags + ["--save", str(ckpt), "--load", str(ckpt)]

    def resumed_from(stdout: str, start: int) -> None:
        if start:
            assert [int(i) for i in LOADED.findall(stdout)] == [start], stdout[-2000:]
        assert int(ITERATION.search(stdout).group(1)) == start + 1, stdout[-2000:]

    for segment in range(3):
        start = tracker(ckpt) if os.path.exists(ckpt / "latest_checkpointed_iteration.txt") else 0
        proc = start_script(str(driver), segment_flags)
        try:
            if segment == 1:  # right after a save began
                seen = read_until(proc, lambda line: line.startswith("saving checkpoint at iteration"))
            else:  # somewhere in a later step or its save
                seen = wait_for_iteration(proc, start + rng.randint(1, 2))
                time.sleep(rng.uniform(0.0, 0.4))
            os.killpg(proc.pid, signal.SIGKILL)
            rest, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        stdout = seen + (rest or "")
        assert proc.returncode == -signal.SIGKILL
        resumed_from(stdout, start)
        started, done = _saves(stdout)
        if started and started[-1] not in done:
            killed_in_save.append(started[-1])
            assert tracker(ckpt) == started[-1] - 1  # the interrupted save is not the checkpoint --load picks
        segments.append(printed_losses(stdout))
    assert killed_in_save, "no kill landed inside a save"
    start = tracker(ckpt)
    final = run_script(PRETRAIN, segment_flags)
    resumed_from(final.stdout, start)
    segments.append(printed_losses(final.stdout))
    assert max(segments[-1]) == 12
    for segment in segments:
        assert segment and all(value == full[i] for i, value in segment.items()), (segment, full)


def test_exit_duration_under_the_deepspeed_launcher(tmp_path, uninterrupted):
    """The same wall-time exit through `deepspeed --num_gpus 2` with ZeRO-2: DeepSpeed's optimizer files are
    saved with the checkpoint, exit 0, and the resumed run continues with the uninterrupted run's losses."""
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
    for got, expected in zip(losses(resumed), uninterrupted[1:4]):
        assert abs(got - expected) <= 2e-6 * abs(expected), (losses(resumed), uninterrupted[1:4])
