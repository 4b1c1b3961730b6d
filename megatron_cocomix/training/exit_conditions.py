"""When a run stops early on purpose: preemption signals, a wall-time budget, and divergence.

Preemption (Megatron's `--exit-signal-handler`, `--exit-duration-in-mins`): a scheduler warns a job before it
kills it (Slurm `--signal=B:TERM@120`). The signal handler only sets a flag; after each iteration every rank
contributes its flag to one all-reduce (MAX), so all ranks agree to stop after the same iteration, save one
checkpoint and exit 0, and a resumed run continues exactly.

Only the ranks act on the signal. Clusters deliver it to every process of the job (Slurm `--signal` without
`B:`, `scancel --signal`, `pkill -f <script>`, torchrun forwarding it to each rank's process group), and the
processes a rank forks (data-loader workers, asynchronous checkpoint writers) share its command line: one of them
dying of it would fail the rank before it could save. `children_ignore_exit_signal` blocks the signal while such
processes start, so they inherit it blocked (and never see it: a data-loader worker takes it in a thread of
`leave_exit_signal_to_rank` and exits only when its rank sent it, as at the rank's exit), while the rank receives it as
soon as the block ends.

Divergence (Megatron's `--check-for-nan-in-loss-and-grad`, on by default): a NaN or Inf loss (checked before the
optimizer step, all ranks agree through one all-reduce) or gradient norm (checked by the optimizer back end
between computing the norm and applying the update) raises `NonFiniteError`; the run stops with one line naming
the iteration, the rank and the quantity, and no checkpoint is written after it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from typing import Dict, Iterator, Optional

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


def exit_signal(args) -> Optional[int]:
    """The signal number the ranks act on (--exit-signal with --exit-signal-handler), or None."""
    return getattr(signal, args.exit_signal) if args.exit_signal_handler else None


@contextlib.contextmanager
def children_ignore_exit_signal(signum: Optional[int]) -> Iterator[None]:
    """Processes forked or spawned inside the block start with `signum` blocked, a mask they inherit (across exec
    too) and never lift, so a signal sent to them stays pending forever. This process receives a signal that
    arrived meanwhile when the block ends. Nothing happens when `signum` is None."""
    if signum is None:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def leave_exit_signal_to_rank(signum: Optional[int], worker_id: int = 0) -> None:
    """A data-loader worker's `worker_init_fn`: ignore the exit signal from anyone but the worker's rank. The worker
    inherited it blocked; a thread takes each one as it comes and ends the worker only when the rank itself sent
    it (as multiprocessing's terminate() at the rank's exit does, and as torch's own worker handler does)."""
    if signum is None:
        return

    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signum}).si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=wait, name="exit-signal", daemon=True).start()


class ExitConditions:
    """The run's reasons to stop early, checked collectively after each iteration. Built before any process is
    forked, so that the signal handler is in place before the data loaders start."""

    REASONS = {1: "receiving {signal}", 2: "{minutes:g} minutes of wall time"}

    def __init__(self, args) -> None:
        self.start = time.time()
        self.minutes = args.exit_duration_in_mins
        self.signal_name = args.exit_signal
        self._received = False
        self.enabled = bool(args.exit_signal_handler or self.minutes)
        self.signum = exit_signal(args)
        if self.signum is not None:
            signal.signal(self.signum, self._on_signal)

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
