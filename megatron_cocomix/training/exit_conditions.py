"""When a run stops early on purpose: preemption signals, a wall-time budget, and divergence.

Preemption (Megatron's `--exit-signal-handler`, `--exit-duration-in-mins`): a scheduler warns a job before it
kills it (Slurm `--signal=B:TERM@120`). The signal handler only sets a flag; after each iteration every rank
contributes its flag to one all-reduce (MAX), so all ranks agree to stop after the same iteration, save one
checkpoint and exit 0, and a resumed run continues exactly.

Divergence (Megatron's `--check-for-nan-in-loss-and-grad`, on by default): a NaN or Inf loss (checked before the
optimizer step, all ranks agree through one all-reduce) or gradient norm (checked by the optimizer back end
between computing the norm and applying the update) raises `NonFiniteError`; the run stops with one line naming
the iteration, the rank and the quantity, and no checkpoint is written after it.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Dict, Optional

import torch

from megatron_cocomix import compat


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is NaN or Inf. `rank` is the lowest rank that saw it."""

    def __init__(self, quantity: str, value: float, rank: int):
        super().__init__(f"rank {rank}: {quantity} is {value}")
        self.quantity, self.value, self.rank = quantity, value, rank


def lowest_rank_where(flag: bool) -> Optional[int]:
    """Collective over the world: the lowest rank whose `flag` is set, or None when no rank's is."""
    world = torch.distributed.get_world_size()
    mine = torch.tensor([torch.distributed.get_rank() if flag else world], dtype=torch.int64, device=compat.device())
    torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MIN)
    lowest = int(mine.item())
    return None if lowest == world else lowest


def check_losses(losses: Dict[str, float]) -> None:
    """Collective: raise NonFiniteError on every rank when any rank holds a NaN / Inf loss."""
    bad = next(((key, value) for key, value in losses.items() if "loss" in key and not math.isfinite(value)), None)
    rank = lowest_rank_where(bad is not None)
    if rank is None:
        return
    quantity, value = bad if bad is not None else ("a loss", float("nan"))
    raise NonFiniteError(quantity, value, rank)


class ExitConditions:
    """The run's reasons to stop early, checked collectively after each iteration."""

    REASONS = {1: "receiving {signal}", 2: "{minutes:g} minutes of wall time"}

    def __init__(self, args) -> None:
        self.start = time.time()
        self.minutes = args.exit_duration_in_mins
        self.signal_name = args.exit_signal
        self._received = False
        self.enabled = bool(args.exit_signal_handler or self.minutes)
        if args.exit_signal_handler:
            signal.signal(getattr(signal, args.exit_signal), self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._received = True

    def reason(self) -> Optional[str]:
        """Collective when enabled: why every rank should stop after this iteration, or None."""
        if not self.enabled:
            return None
        code = 1 if self._received else 2 if self.minutes and time.time() - self.start > 60 * self.minutes else 0
        agreed = torch.tensor([code], dtype=torch.int64, device=compat.device())
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        code = int(agreed.item())
        if not code:
            return None
        return self.REASONS[code].format(signal=self.signal_name, minutes=self.minutes)
