"""Training and validation logs in Megatron-LM's line format (stdout) and tensorboard.

The stdout line keeps Megatron's field names and number formats so scripts that parse Megatron logs keep
working; losses print with 7 significant digits (`{:.6E}`):

    [2026-01-01 12:00:00] iteration       10/     100 | consumed samples:          640 | elapsed time per
    iteration (ms): 123.4 | ... | learning rate: 3.000000E-04 | global batch size:    64 | lm loss:
    7.123456E+00 | loss scale: 1.0 | grad norm: 1.234 | number of skipped iterations:   0 | ...

The line is printed by the last rank (it holds the loss, as in Megatron); tensorboard is written there too.
"""

from __future__ import annotations

import argparse
import math
import time
from datetime import datetime
from typing import Dict, List, Optional

import torch

from megatron_cocomix.distributed import is_last_rank


class TrainingLogger:
    def __init__(self, args: argparse.Namespace, model: List[torch.nn.Module]):
        self.args = args
        self.history: List[dict] = []
        self._window: Dict[str, List[float]] = {}
        self._window_time = 0.0
        self._window_iters = 0
        self._skipped = 0
        self._nan = 0
        self.writer = None
        if args.tensorboard_dir and is_last_rank():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)

    def log_startup(self) -> None:
        pass

    def training_log(self, iteration: int, losses: Dict[str, float], learning_rate: float,
                     grad_norm: Optional[float], loss_scale: Optional[float], skipped: bool,
                     iteration_time: float, consumed_samples: int) -> None:
        args = self.args
        self.history.append({"iteration": iteration, **losses, "lr": learning_rate,
                             "grad_norm": grad_norm, "time": iteration_time})
        for key, value in losses.items():
            self._window.setdefault(key, []).append(value)
            if not math.isfinite(value):
                self._nan += 1
        self._skipped += int(skipped)
        self._window_time += iteration_time
        self._window_iters += 1

        if self.writer is not None and iteration % args.tensorboard_log_interval == 0:
            for key, value in losses.items():
                self.writer.add_scalar(key, value, iteration)
            self.writer.add_scalar("learning-rate", learning_rate, iteration)
            if grad_norm is not None:
                self.writer.add_scalar("grad-norm", grad_norm, iteration)
            if args.fp16 and loss_scale is not None:
                self.writer.add_scalar("loss-scale", loss_scale, iteration)
            self.writer.add_scalar("iteration-time", iteration_time, iteration)

        if iteration % args.log_interval != 0 or not is_last_rank():
            return
        elapsed_ms = 1000.0 * self._window_time / max(1, self._window_iters)
        line = f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}]"
        line += f" iteration {iteration:8d}/{args.train_iters:8d} |"
        line += f" consumed samples: {consumed_samples:12d} |"
        line += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
        line += f" learning rate: {learning_rate:.6E} |"
        line += f" global batch size: {args.global_batch_size:5d} |"
        for key, values in self._window.items():
            line += f" {key}: {sum(values) / len(values):.6E} |"
        if loss_scale is not None:
            line += f" loss scale: {loss_scale:.1f} |"
        if grad_norm is not None:
            line += f" grad norm: {grad_norm:.3f} |"
        line += f" number of skipped iterations: {self._skipped:3d} |"
        line += f" number of nan iterations: {self._nan:3d} |"
        print(line, flush=True)
        self._window.clear()
        self._window_time = 0.0
        self._window_iters = 0
        self._skipped = 0
        self._nan = 0

    def validation_log(self, iteration: int, losses: Dict[str, float],
                       label: str = "validation loss at iteration") -> None:
        if not is_last_rank() or not losses:
            return
        line = f" {label} {iteration} |" if "iteration" in label.split()[-1:] else f" {label} |"
        for key, value in losses.items():
            ppl = math.exp(min(20.0, value))
            line += f" {key} value: {value:.6E} | {key} PPL: {ppl:.6E} |"
            if self.writer is not None:
                self.writer.add_scalar(f"{key} validation", value, iteration)
                self.writer.add_scalar(f"{key} validation ppl", ppl, iteration)
        length = len(line) + 1
        print("-" * length + "\n" + line + "\n" + "-" * length, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
