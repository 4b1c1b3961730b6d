"""Training and validation logs in Megatron-LM's line format (stdout), tensorboard and Weights & Biases.

The stdout line keeps Megatron's field names and number formats so scripts that parse Megatron logs keep
working; every entry of the loss dictionary prints with 7 significant digits (`{:.6E}`), averaged over the
iterations of the log interval that updated the model:

    [2026-01-01 12:00:00.000000] iteration       10/     100 | consumed samples:          640 | elapsed time per
    iteration (ms): 123.4 | throughput per GPU (TFLOP/s/GPU): 312.5 | MFU (%): 31.6 | tokens per second: 531234 |
    learning rate: 3.000000E-04 | global batch size:    64 | lm loss: 7.123456E+00 | concept loss: 9.876543E+00 |
    loss scale: 1.0 | grad norm: 1.234 | number of skipped iterations:   0 | number of nan iterations:   0 |
    max allocated memory (MB): 1234.5 | max reserved memory (MB): 2345.6 |

TFLOP/s per device = FLOPs per iteration (training/flops.py: model FLOPs, no recompute) / (iteration time x
world size); MFU = that / the device's peak (hardware.PEAK_TFLOPS, only on GPUs it knows); tokens per second
counts the global batch's input tokens. Memory is the device's peak allocated / reserved bytes on GPUs and
the process's peak resident set on CPU.

Tensorboard (last rank, as in Megatron): each loss key, 'learning-rate', 'batch-size', 'grad-norm',
'loss-scale' (also '<name> vs samples' for these), 'tokens' (tokens seen, by iteration), and every --log-interval: 'iteration-time' (s),
'throughput' (Megatron's TFLOP/s/GPU tag) and its alias 'tflops-per-device', 'tokens-per-sec', 'mfu' (%, GPU
only), 'mem-max-allocated-bytes' / 'mem-reserved-bytes' / 'mem-max-reserved-bytes' (GPU) or
'mem-max-rss-bytes' (CPU); validation: '<key> validation' and '<key> validation ppl'.
With --wandb-project the same scalars go to W&B (training/scalar_writers.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch

from megatron_cocomix.training import flops, memory
from megatron_cocomix.training.hardware import device_peak_tflops, memory_stats
from megatron_cocomix.training.scalar_writers import ScalarWriters, build_scalar_writers

_MB = 1024.0 * 1024.0


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _is_last_rank() -> bool:
    return _rank() == _world_size() - 1


class TrainingLogger:
    """Accumulates per-iteration values and prints / writes them every --log-interval iterations.

    `local_parameter_count` is this rank's parameter count (as the optimizer back end counts it): the start-up
    report compares it, per pipeline stage, with the estimate."""

    def __init__(self, args: argparse.Namespace, local_parameter_count: Optional[int] = None):
        self.args = args
        self.local_parameter_count = local_parameter_count
        self.history: List[dict] = []
        self._sums: Dict[str, float] = {}
        self._counts: Dict[str, int] = {}
        self._window_time = 0.0
        self._window_iters = 0
        self._skipped = 0
        self._nan = 0
        self._pending: List[tuple] = []
        self._grad_norm: Optional[float] = None
        self._loss_scale: Optional[float] = None
        self._memory_reported = False
        self.flops_per_iteration: Optional[float] = None
        self.flops_note: Optional[str] = None
        try:
            self.flops_per_iteration = flops.num_floating_point_operations(args)
        except ValueError as e:
            self.flops_note = f"FLOPs not estimated: {e}"
        self.peak_tflops = device_peak_tflops(args)
        # Every scalar goes through this one fan-out, so tensorboard and W&B always hold the same values.
        self.writer = build_scalar_writers(args) if _is_last_rank() else ScalarWriters([])

    # ---------------------------------------------------------------------------------------------------
    def _built_parameters_per_stage(self) -> Optional[List[int]]:
        """Parameters on TP rank 0 / DP rank 0 of each pipeline stage, summed over its virtual chunks.
        Collective: every rank must call it."""
        if not torch.distributed.is_initialized() or self.local_parameter_count is None:
            return None
        from megatron.core import parallel_state

        from megatron_cocomix import compat

        pp = self.args.pipeline_model_parallel_size
        counts = torch.zeros(pp, dtype=torch.float64, device=compat.device())
        if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
            counts[parallel_state.get_pipeline_model_parallel_rank()] = self.local_parameter_count
        torch.distributed.all_reduce(counts)
        return [int(c) for c in counts.tolist()]

    def log_startup(self) -> None:
        """Rank 0 prints parameters, FLOPs per iteration and the per-device memory estimate."""
        built = self._built_parameters_per_stage()
        if _rank() != 0:
            return
        try:
            report = startup_report(self.args, actual_stage_params=built)
        except ValueError as e:
            report = f" > model size and cost estimate unavailable: {e}"
        if self.flops_note:
            report += f"\n   {self.flops_note} (no TFLOP/s or MFU on the log line)"
        print(report, flush=True)

    # ---------------------------------------------------------------------------------------------------
    def training_log(self, iteration: int, losses: Dict[str, Union[float, torch.Tensor]], learning_rate: float,
                     grad_norm: Union[None, float, torch.Tensor], loss_scale: Union[None, float, torch.Tensor],
                     skipped: bool, iteration_time: float, consumed_samples: int) -> None:
        """One iteration's values. Tensors (a loss as a [sum, count] pair or a value, the gradient norm, the loss
        scale) may still be on the device: they are read on the host at the next `materialize()`, which this call
        makes every --log-interval iterations, so the iterations in between never wait for the device."""
        self._pending.append((iteration, losses, learning_rate, grad_norm, loss_scale, skipped, iteration_time,
                              consumed_samples))
        if iteration % self.args.log_interval == 0:
            self.materialize()
            self._print_log_line(iteration, learning_rate, consumed_samples)

    def materialize(self) -> None:
        """Read the pending iterations' device values with one copy to the host and account for them: history,
        log-line averages, tensorboard / W&B scalars. The wait for the device counts towards the iterations'
        time, so the log line's time per iteration is the device's, not the time it took to queue the work."""
        if not self._pending:
            return
        start = time.time()
        tensors = [value for entry in self._pending for value in _entry_values(entry) if torch.is_tensor(value)]
        host = iter(torch.cat([t.detach().double().reshape(-1) for t in tensors]).tolist() if tensors else [])
        wait = time.time() - start
        for i, entry in enumerate(self._pending):
            iteration, losses, lr, grad_norm, loss_scale, skipped, iteration_time, consumed = _read_entry(entry, host)
            if i == len(self._pending) - 1:
                iteration_time += wait  # the device's backlog, waited for after the last queued iteration
            self._account(iteration, losses, lr, grad_norm, loss_scale, skipped, iteration_time, consumed)
        self._pending.clear()

    def _account(self, iteration: int, losses: Dict[str, float], learning_rate: float, grad_norm: Optional[float],
                 loss_scale: Optional[float], skipped: bool, iteration_time: float, consumed_samples: int) -> None:
        args = self.args
        self.history.append({"iteration": iteration, **losses, "lr": learning_rate,
                             "grad_norm": grad_norm, "time": iteration_time})
        got_nan = any(not math.isfinite(v) for v in losses.values())
        self._nan += int(got_nan)
        self._skipped += int(skipped)
        if not skipped and not got_nan:
            for key, value in losses.items():
                self._sums[key] = self._sums.get(key, 0.0) + value
                self._counts[key] = self._counts.get(key, 0) + 1
        self._window_time += iteration_time
        self._window_iters += 1
        self._grad_norm, self._loss_scale = grad_norm, loss_scale

        writer = self.writer
        if writer and iteration % args.tensorboard_log_interval == 0:
            scalars = dict(losses)
            scalars["learning-rate"] = learning_rate
            scalars["batch-size"] = args.global_batch_size
            if grad_norm is not None:
                scalars["grad-norm"] = grad_norm
            if loss_scale is not None:
                scalars["loss-scale"] = loss_scale
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, iteration)
                writer.add_scalar_vs_samples(tag, value, iteration, consumed_samples)
            # Tokens seen at each iteration: what runs of different batch sizes are compared by.
            writer.add_scalar("tokens", consumed_samples * args.seq_length, iteration)

    def _print_log_line(self, iteration: int, learning_rate: float, consumed_samples: int) -> None:
        args = self.args
        batch_size = args.global_batch_size
        grad_norm, loss_scale, writer = self._grad_norm, self._loss_scale, self.writer
        elapsed = self._window_time / max(1, self._window_iters)
        memory = memory_stats()
        self._report_memory_once(iteration, memory)
        tokens_per_sec = batch_size * args.seq_length / elapsed if elapsed > 0 else 0.0
        tflops = mfu = None
        if self.flops_per_iteration is not None and elapsed > 0:
            tflops = self.flops_per_iteration / (elapsed * 1e12 * _world_size())
            if self.peak_tflops:
                mfu = 100.0 * tflops / self.peak_tflops

        if writer:
            writer.add_scalar("iteration-time", elapsed, iteration)
            writer.add_scalar("tokens-per-sec", tokens_per_sec, iteration)
            if tflops is not None:
                writer.add_scalar("throughput", tflops, iteration)
                writer.add_scalar("tflops-per-device", tflops, iteration)
            if mfu is not None:
                writer.add_scalar("mfu", mfu, iteration)
            if "max allocated" in memory:
                writer.add_scalar("mem-max-allocated-bytes", memory["max allocated"], iteration)
                writer.add_scalar("mem-reserved-bytes", memory["reserved"], iteration)
                writer.add_scalar("mem-max-reserved-bytes", memory["max reserved"], iteration)
            else:
                writer.add_scalar("mem-max-rss-bytes", memory["max RSS"], iteration)

        if _is_last_rank():
            line = f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f')}]"
            line += f" iteration {iteration:8d}/{args.train_iters:8d} |"
            line += f" consumed samples: {consumed_samples:12d} |"
            line += f" elapsed time per iteration (ms): {elapsed * 1000.0:.1f} |"
            if args.log_throughput:
                if tflops is not None:
                    line += f" throughput per GPU (TFLOP/s/GPU): {tflops:.1f} |"
                if mfu is not None:
                    line += f" MFU (%): {mfu:.1f} |"
                line += f" tokens per second: {tokens_per_sec:.0f} |"
            line += f" learning rate: {learning_rate:.6E} |"
            line += f" global batch size: {batch_size:5d} |"
            for key, total in self._sums.items():
                line += f" {key}: {total / self._counts[key]:.6E} |"
            line += f" loss scale: {1.0 if loss_scale is None else loss_scale:.1f} |"
            if grad_norm is not None:
                line += f" grad norm: {grad_norm:.3f} |"
            line += f" number of skipped iterations: {self._skipped:3d} |"
            line += f" number of nan iterations: {self._nan:3d} |"
            if "max allocated" in memory:
                line += f" max allocated memory (MB): {memory['max allocated'] / _MB:.1f} |"
                line += f" max reserved memory (MB): {memory['max reserved'] / _MB:.1f} |"
            else:
                line += f" max RSS (MB): {memory['max RSS'] / _MB:.1f} |"
            print(line, flush=True)
        self._sums.clear()
        self._counts.clear()
        self._window_time = 0.0
        self._window_iters = 0
        self._skipped = 0
        self._nan = 0

    def _report_memory_once(self, iteration: int, memory: Dict[str, float]) -> None:
        """Megatron's per-rank memory line after the first logged iteration, from data-parallel rank 0 of every
        model-parallel rank (stages differ; data-parallel replicas do not)."""
        if self._memory_reported:
            return
        self._memory_reported = True
        if torch.distributed.is_initialized():
            from megatron.core import parallel_state

            if parallel_state.get_data_parallel_rank() != 0:
                return
        line = f"[Rank {_rank()}] (after {iteration} iterations) memory (MB)"
        for key in ("allocated", "max allocated", "reserved", "max reserved", "max RSS"):
            if key in memory:
                line += f" | {key}: {memory[key] / _MB:.2f}"
        # One write with its newline: every rank prints this line, possibly at the same moment.
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    # ---------------------------------------------------------------------------------------------------
    def validation_log(self, iteration: int, losses: Dict[str, float], label: Optional[str] = None) -> None:
        """Megatron's block: ' validation loss at iteration N on validation set | lm loss value: ... | lm loss
        PPL: ... | ' between dashed lines; `label` replaces 'validation loss at iteration N on validation set'."""
        if not _is_last_rank() or not losses:
            return
        label = label or f"validation loss at iteration {iteration} on validation set"
        line = f" {label} | "
        for key, value in losses.items():
            line += f"{key} value: {value:.6E} | "
            self.writer.add_scalar(f"{key} validation", value, iteration)
            if "loss" not in key:  # accuracies and other metrics have no perplexity
                continue
            ppl = math.exp(min(20.0, value))
            line += f"{key} PPL: {ppl:.6E} | "
            self.writer.add_scalar(f"{key} validation ppl", ppl, iteration)
        length = len(line) + 1
        print("-" * length + "\n" + line + "\n" + "-" * length, flush=True)

    def close(self) -> None:
        self.writer.close()


def _entry_values(entry: tuple) -> list:
    """The values of a pending iteration that may be tensors, in a fixed order: losses, grad norm, loss scale."""
    _, losses, _, grad_norm, loss_scale, *_ = entry
    return list(losses.values()) + [grad_norm, loss_scale]


def _read_entry(entry: tuple, host: Iterator[float]) -> tuple:
    """A pending iteration with its tensors replaced by the host floats that follow in `host` (a [sum, count] pair
    becomes sum / count, or is left out when its count is 0)."""
    iteration, losses, learning_rate, grad_norm, loss_scale, skipped, iteration_time, consumed = entry

    def read(value):
        if not torch.is_tensor(value):
            return value
        numbers = [next(host) for _ in range(value.numel())]
        if len(numbers) == 2:
            return numbers[0] / numbers[1] if numbers[1] > 0 else None
        return numbers[0]

    read_losses = {key: read(value) for key, value in losses.items()}
    read_losses = {key: value for key, value in read_losses.items() if value is not None}
    return (iteration, read_losses, learning_rate, read(grad_norm), read(loss_scale), skipped, iteration_time,
            consumed)


# ---------------------------------------------------------------------------------------------------------
# Start-up report

def format_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def startup_report(args: argparse.Namespace, actual_stage_params: Optional[Sequence[int]] = None) -> str:
    """The start-up summary: parameters, FLOPs per iteration by term, memory per device by stage."""
    counts = memory.parameter_counts(args)
    lines = [" > model size and cost estimate:"]
    lines.append(f"   parameters (unique): {counts.unique_total} ({format_count(counts.unique_total)})")
    tp = args.tensor_model_parallel_size
    for stage in range(args.pipeline_model_parallel_size):
        line = (f"   parameters on pipeline stage {stage}: {counts.stage_total(stage)}, per tensor-parallel rank: "
                f"{counts.per_device(stage, tp):.0f}")
        if actual_stage_params is not None:
            line += f" (built model: {actual_stage_params[stage]})"
        lines.append(line)
    terms = flops.flops_per_sequence(args)
    gbs = args.global_batch_size
    model = flops.num_floating_point_operations(args)
    hardware = flops.num_floating_point_operations(args, include_recompute=True)
    lines.append(f"   FLOPs per iteration: {model:.4e} model, {hardware:.4e} with recompute "
                 f"({model / (gbs * args.seq_length):.4e} per token; causal attention counted as half)")
    for name, value in terms.items():
        if value:
            lines.append(f"     {name}: {gbs * value:.4e} ({100 * value / max(sum(terms.values()), 1):.1f}%)")
    mib = 1024.0 ** 2
    for est in memory.memory_estimate(args):
        lines.append(f"   memory estimate per device, stage {est.stage} (MB): weights {est.weights / mib:.1f} | "
                     f"grads {est.grads / mib:.1f} | optimizer {est.optimizer / mib:.1f} | "
                     f"activations {est.activations / mib:.1f} | total {est.total / mib:.1f} "
                     f"({'; '.join(est.notes)})")
    return "\n".join(lines)
