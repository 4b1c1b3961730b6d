"""Launch helpers for multi-process tests: torchrun (or one plain process) on gloo, tiny models."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from tests.helpers.paths import ROOT

# Worker scripts, run by file path under a launcher; test_env() puts ROOT on their PYTHONPATH.
HELPERS = os.path.dirname(os.path.abspath(__file__))
PRETRAIN_WORKER = os.path.join(HELPERS, "pretrain_worker.py")  # one run -> summary JSON (run_pretrain)
MULTI_RUN_WORKER = os.path.join(HELPERS, "multi_run_worker.py")  # several runs in one launch -> {name: summary}
CONCEPT_OPS_WORKER = os.path.join(HELPERS, "concept_ops_worker.py")  # tensor-parallel concept op checks
EVALUATE_WORKER = os.path.join(HELPERS, "evaluate_worker.py")  # tools/evaluate.py runs under one launch
EXPORT_LOGITS_WORKER = os.path.join(HELPERS, "export_logits_worker.py")  # a checkpoint vs its export, one device

# A tiny GPT: 4 layers so that PP2 x virtual-PP2 has one layer per virtual stage. Vocabulary 255 + EOD = 256
# needs no padding at TP1 or TP2, so the output softmax is the same at every layout. Dropout off: losses are
# then a deterministic function of the weights and data. No warmup: a warmup starts megatron's schedule at a
# learning rate of 0, which would make the first of the 4 updates a no-op; here all 4 move the weights (cosine from
# 1e-3 towards 1e-4), and the final validation follows the 4th.
TINY_GPT = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4", "--lr", "1e-3",
    "--lr-warmup-iters", "0", "--lr-decay-style", "cosine", "--min-lr", "1e-4",
    "--mock-data", "--vocab-size", "255", "--make-vocab-size-divisible-by", "128",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "1", "--eval-interval", "2",
    "--eval-iters", "1", "--num-workers", "0", "--seed", "1234",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def launch_command(script: str, args: Sequence[str], nproc: int = 1, launcher: str = "torchrun",
                   launcher_args: Sequence[str] = ()) -> List[str]:
    """The command line that runs `script` with `nproc` processes (torchrun, the deepspeed launcher, or plain);
    `launcher_args` go to torchrun (e.g. --max-restarts)."""
    if launcher == "torchrun" and (nproc > 1 or launcher_args):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), *launcher_args, script, *args]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", str(free_port()), script, *args]
    return [sys.executable, script, *args]


def run_script(script: str, args: Sequence[str], nproc: int = 1, timeout: int = 300,
               launcher: str = "torchrun", check: bool = True,
               env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run a script with `nproc` processes (`env`: extra environment variables); returns the completed process
    (stdout + stderr captured)."""
    cmd = launch_command(script, args, nproc, launcher)
    proc = subprocess.run(cmd, cwd=ROOT, env=test_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def start_script(script: str, args: Sequence[str], nproc: int = 1, stderr_path: Optional[str] = None,
                 launcher: str = "torchrun", launcher_args: Sequence[str] = ()) -> subprocess.Popen:
    """Start a script in the background in its own process group; stdout is a text pipe read line by line."""
    env = test_env()
    env["PYTHONUNBUFFERED"] = "1"
    stderr = open(stderr_path, "w") if stderr_path else subprocess.DEVNULL
    return subprocess.Popen(launch_command(script, args, nproc, launcher, launcher_args), cwd=ROOT, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)


def run_pretrain(args: Sequence[str], tmp_path, nproc: int = 1, name: str = "run", timeout: int = 300,
                 launcher: str = "torchrun", env: Optional[Dict[str, str]] = None) -> dict:
    """Train with pretrain_cocomix's providers; returns the summary (train_history, valid, iteration...)."""
    summary = os.path.join(str(tmp_path), f"{name}.json")
    proc = run_script(PRETRAIN_WORKER, [summary, *args], nproc=nproc, timeout=timeout, launcher=launcher, env=env)
    with open(summary) as f:
        result = json.load(f)
    result["stdout"] = proc.stdout
    return result


def losses(summary: dict, key: str = "lm loss") -> List[float]:
    return [entry[key] for entry in summary["train_history"]]


def assert_close(actual: Sequence[float], expected: Sequence[float], rtol: float = 1e-5,
                 what: Optional[str] = None) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} values vs {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert abs(a - e) <= rtol * abs(e), f"{what}: step {i + 1}: {a!r} vs reference {e!r} (rtol {rtol})"


def update_learning_rates(summary: dict, flags: Sequence[str], resumed_from: Optional[dict] = None) -> List[float]:
    """The learning rate each logged iteration's optimizer step used.

    The log (as Megatron's) shows the rate after the scheduler's step, i.e. the NEXT step's: iteration i stepped
    with the rate logged at iteration i - 1. The rate of a run's first step is not logged: from scratch it is
    megatron's initial rate, 0 during a warmup and --lr without one (`flags`: the run's flags); a run resumed from
    another (`resumed_from`: that run's summary) starts with the rate the other logged at the resumed iteration."""
    history = summary["train_history"]
    if resumed_from is not None:
        first = next(e["lr"] for e in resumed_from["train_history"] if e["iteration"] == history[0]["iteration"] - 1)
    else:
        values = {}
        for flag, value in zip(flags, list(flags[1:]) + [None]):
            if flag.startswith("--"):
                values[flag] = value
        first = 0.0 if int(values.get("--lr-warmup-iters") or 0) > 0 else float(values["--lr"])
    return [first] + [e["lr"] for e in history[:-1]]


def assert_real_updates(rates: Sequence[float], at_least: int = 4, what: Optional[str] = None) -> None:
    """At least `at_least` optimizer steps, all with a non-zero learning rate (update_learning_rates)."""
    assert len(rates) >= at_least, f"{what}: {len(rates)} optimizer steps, fewer than {at_least}"
    assert all(rate > 0 for rate in rates), f"{what}: a step with learning rate 0 changes no weight: {list(rates)}"
