"""Failures a job survives by itself: a worker killed under torchrun's elastic restarts, and kill -9 in the middle of
an asynchronous checkpoint. Both are 2-rank torchrun jobs that save periodically with --load = --save (the same
command resumes them), compared with conftest's `uninterrupted` run: every loss printed before and after the
failure equals the uninterrupted run's, digit for digit.
"""

import os
import re
import signal
import subprocess
import textwrap

import pytest

from tests.helpers.checkpoint_files import tracker
from tests.helpers.interrupted_runs import LOADED, flags, printed_losses, read_until, wait_for_iteration
from tests.helpers.launch import losses, run_pretrain, start_script
from tests.helpers.paths import ROOT

PRETRAIN = os.path.join(ROOT, "pretrain_cocomix.py")
TRACKER = "latest_checkpointed_iteration.txt"


def _as_printed(values) -> list:
    return [f"{v:.6E}" for v in values]  # Megatron's log line format


def _kill_job(pattern: str, sig=signal.SIGKILL) -> None:
    subprocess.run(["pkill", f"-{int(sig)}", "-f", "--", pattern])


def test_torchrun_restarts_the_group_after_a_worker_is_killed(tmp_path, uninterrupted):
    """torchrun --max-restarts 1; one rank is killed with SIGKILL after iteration 5. torchrun stops the other,
    starts the group again with the same command, the new ranks load the last complete checkpoint and finish."""
    ckpt = tmp_path / "ckpt"
    run_flags = flags(**{"--save": str(ckpt), "--load": str(ckpt), "--save-interval": "2", "--exit-interval": "12",
                         "--exit-signal-handler": None, "--num-workers": "1"})
    stderr = tmp_path / "stderr.txt"
    proc = start_script(PRETRAIN, run_flags, nproc=2, stderr_path=str(stderr), launcher_args=["--max-restarts", "1"])
    try:
        before = wait_for_iteration(proc, 5)
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2, ranks
        os.kill(int(ranks[-1]), signal.SIGKILL)
        after, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            _kill_job(re.escape(str(ckpt)))
    log = stderr.read_text()
    assert proc.returncode == 0, log[-3000:]
    stdout = before + after
    [loaded] = [int(i) for i in LOADED.findall(stdout)]
    first_attempt, second_attempt = stdout.split("loaded checkpoint", 1)
    # The restarted group resumed from the last checkpoint the first attempt completed.
    completed = [int(i) for i in re.findall(r"successfully saved checkpoint at iteration\s+(\d+)", first_attempt)]
    assert loaded == completed[-1] >= 4, (loaded, completed)
    printed_first, printed_second = printed_losses(first_attempt), printed_losses(second_attempt)
    assert min(printed_second) == loaded + 1 and max(printed_second) == 12
    assert max(printed_first) >= 5
    expected = dict(enumerate(_as_printed(uninterrupted[:12]), start=1))
    for printed in (printed_first, printed_second):
        assert all(value == expected[i] for i, value in printed.items()), (printed, expected)
    assert tracker(ckpt) == 12


SLOW_RANK_1_WRITER = textwrap.dedent("""
    # pretrain_cocomix.py with rank 1's asynchronous checkpoint writer (a forked process) starting 3 s late; every
    # writer prints when it is done. The repository root is on PYTHONPATH (start_script's environment).
    import runpy, sys, time
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    real_write = FileSystemWriterAsync.write_preloaded_data_multiproc

    def write(transform_list, use_msc, rank, write_buckets, results_queue):
        if rank == 1:
            time.sleep(3)
        real_write(transform_list, use_msc, rank, write_buckets, results_queue)
        print(f"asynchronous writer of rank {{rank}} finished", flush=True)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write)
    sys.argv = [{script!r}] + sys.argv[1:]
    runpy.run_path({script!r}, run_name="__main__")
""")


@pytest.mark.slow
def test_async_save_publishes_after_every_rank_and_survives_kill_9(tmp_path, uninterrupted):
    """--async-save with rank 1's writer 3 s late. The save of iteration 3: training goes on while it is written,
    and the tracker stays put after rank 0's writer is done, until rank 1's is. The save of iteration 6: every
    process of the job is killed with SIGKILL while rank 1's writer waits; the tracker still names 3, and the
    same command resumes from 3 with the uninterrupted run's losses."""
    ckpt = tmp_path / "ckpt"
    driver = tmp_path / "slow_writer_driver.py"
    driver.write_text(SLOW_RANK_1_WRITER.format(script=PRETRAIN))
    run_flags = flags(**{"--save": str(ckpt), "--load": str(ckpt), "--save-interval": "3", "--async-save": None})
    proc = start_script(str(driver), run_flags, nproc=2, stderr_path=str(tmp_path / "stderr.txt"))
    job = r"slow_writer_driver[.]py .*" + re.escape(str(ckpt))
    try:
        seen = read_until(proc, lambda line: re.match(r"saving checkpoint at iteration\s+3 ", line))
        writing = read_until(proc, lambda line: "asynchronous writer of rank 0 finished" in line)
        assert not os.path.exists(ckpt / TRACKER)  # rank 0's shards are written, rank 1's are not
        during = read_until(proc, lambda line: re.search(r"successfully saved checkpoint at iteration\s+3 ", line))
        assert "asynchronous writer of rank 1 finished" in during
        # Training went on while the save was written: an iteration after 3 is logged before the save is published
        # (before or after rank 0's writer finished, as the two processes happen to be scheduled).
        assert re.search(r"\] iteration\s+[45]/", writing + during), writing + during
        seen += writing
        assert tracker(ckpt) == 3
        seen += during + read_until(proc, lambda line: re.match(r"saving checkpoint at iteration\s+6 ", line))
        seen += read_until(proc, lambda line: "asynchronous writer of rank 0 finished" in line)
        _kill_job(job)  # every process of the job: torchrun, the ranks, their writers
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_job(job)
    assert not subprocess.run(["pgrep", "-f", "--", job], capture_output=True).stdout
    assert tracker(ckpt) == 3
    assert any(n.startswith("iter_0000006.tmp-") for n in os.listdir(ckpt)), os.listdir(ckpt)
    expected = dict(enumerate(_as_printed(uninterrupted[:20]), start=1))
    assert all(value == expected[i] for i, value in printed_losses(seen).items())

    resumed = run_pretrain(flags(**{"--save": str(ckpt), "--load": str(ckpt), "--save-interval": "3",
                                    "--async-save": None, "--exit-interval": "8"}), tmp_path, nproc=2)
    assert "loaded checkpoint" in resumed["stdout"] and [int(i) for i in LOADED.findall(resumed["stdout"])] == [3]
    assert [e["iteration"] for e in resumed["train_history"]] == [4, 5, 6, 7, 8]
    assert losses(resumed) == uninterrupted[3:8]
    # The save at the exit was asynchronous too: published before the process ended; the dead one is gone.
    assert tracker(ckpt) == 8
    assert sorted(os.listdir(ckpt)) == ["iter_0000003", "iter_0000006", "iter_0000008", TRACKER]
