"""Iteration time around a checkpoint save, with and without --async-save (CPU, torchrun on gloo).

    python benchmarks/async_save.py [--nproc 2] [--layers 8] [--hidden 512] [--iters 16] [--save-interval 4]

Trains a GPT on mock data (vocabulary 255, so the checkpoint is mostly transformer weights and their Adam state),
saving every --save-interval iterations, once with synchronous saves and once with --async-save, and reads the
timestamps of Megatron's log lines: the wall time from one iteration's log line to the next is the iteration plus
whatever ran between them (the save, for an iteration that saves). Prints one Markdown table row per mode: the
median gap between iterations that do not save, the median gap across a save, the median time the foreground spent
in the save (the trainer's own "[x s]" / "[x s in the foreground]"), the wall time from iteration 3 to the last,
and the checkpoint size.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = re.compile(r"^ \[(\S+ \S+)\] iteration\s+(\d+)/", re.M)


def run(mode: str, options, work: str) -> dict:
    save = os.path.join(work, mode)
    flags = ["--num-layers", str(options.layers), "--hidden-size", str(options.hidden), "--num-attention-heads", "8",
             "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", str(2 * options.nproc),
             "--train-iters", str(options.iters), "--lr", "1e-4", "--mock-data", "--vocab-size", "255",
             "--make-vocab-size-divisible-by", "128", "--log-interval", "1", "--eval-iters", "0",
             "--num-workers", "0", "--use-distributed-optimizer", "--save", save,
             "--save-interval", str(options.save_interval)] + (["--async-save"] if mode == "async" else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(options.nproc), "--master_port",
           str(options.port), os.path.join(ROOT, "pretrain_cocomix.py"), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    stamps = {int(i): datetime.datetime.fromisoformat(t) for t, i in STAMP.findall(out)}
    gaps = {i: (stamps[i + 1] - stamps[i]).total_seconds() for i in stamps if i + 1 in stamps}
    # The first iterations warm up; the last save is waited for at the end of training.
    steady = {i: g for i, g in gaps.items() if i > 2}
    saving = [g for i, g in steady.items() if i % options.save_interval == 0]
    plain = [g for i, g in steady.items() if i % options.save_interval != 0]
    # The trainer's own timing: "[x s]" of a synchronous save, "[x s in the foreground]" of an asynchronous one.
    pattern = r"\[([\d.]+) s in the foreground\]" if mode == "async" else r"successfully saved checkpoint .* \[([\d.]+) s\]"
    foreground = [float(x) for x in re.findall(pattern, out)]
    last = max(int(n[5:]) for n in os.listdir(save) if n.startswith("iter_") and n[5:].isdigit())
    size = sum(os.path.getsize(os.path.join(dirpath, f)) for dirpath, _, files in
               os.walk(os.path.join(save, f"iter_{last:07d}")) for f in files)
    first, end = 3, max(stamps)
    return {"plain": statistics.median(plain), "saving": statistics.median(saving),
            "foreground": statistics.median(foreground), "size": size / 2 ** 20,
            "total": (stamps[end] - stamps[first]).total_seconds(), "span": f"{first}-{end}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--iters", type=int, default=16)
    parser.add_argument("--save-interval", type=int, default=4)
    parser.add_argument("--port", type=int, default=29701)
    options = parser.parse_args()
    work = tempfile.mkdtemp(prefix="async_save_")
    try:
        print("| mode | iteration without a save (s) | iteration + save (s) | save in the foreground (s) | "
              "iterations, wall time (s) | checkpoint (MiB) |")
        print("|---|---:|---:|---:|---:|---:|")
        for mode in ("sync", "async"):
            r = run(mode, options, work)
            print(f"| {mode} | {r['plain']:.2f} | {r['saving']:.2f} | {r['foreground']:.2f} | {r['span']}: "
                  f"{r['total']:.1f} | {r['size']:.0f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
