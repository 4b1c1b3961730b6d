"""When a run stops early on purpose: preemption signals, a wall-time budget, and divergence.

Preemption (Megatron's `--exit-signal-handler`, `--exit-duration-in-mins`): a scheduler warns a job before it
kills it (Slurm `--signal=B:TERM@120`). The signal handler only sets a flag; after each iteration every rank
contributes its flag to one all-reduce (MAX) on a gloo group, so all ranks agree to stop after the same
iteration, save one checkpoint and exit 0, and a resumed run continues exactly. The agreement is a host-side
collective: it never waits for the GPU.

Divergence (Megatron's `--check-for-nan-in-loss-and-grad`, on by default): a NaN or Inf loss or gradient norm
never reaches the weights. `DivergenceGuard` turns each step's losses and gradient norm into a flag on the device;
the optimizer back end skips the update on the device when it is set (megatron's optimizer: torch's fused Adam
`found_inf`), or reads it on the host first where it cannot (DeepSpeed). The flags reach the host only where the
loop synchronises anyway (log lines, validation, checkpoints, the end of training): `check()` then raises
`NonFiniteError` naming the first diverged iteration, the rank and the quantity; the run stops with one line and
no checkpoint is written after it.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Dict, List, Optional, Tuple

import torch

from megatron_cocomix import compat


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is NaN or Inf. `rank` is the lowest rank that saw it first, at `iteration`."""

    def __init__(self, quantity: str, value: float, rank: int, iteration: Optional[int] = None):
        super().__init__(f"rank {rank}: {quantity} is {value}")
        self.quantity, self.value, self.rank, self.iteration = quantity, value, rank, iteration


def scalar_value(value: torch.Tensor) -> torch.Tensor:
    """A loss entry as one number: a [sum, count] pair -> sum / count (count 0 reads as the sum), a 0-d value as is."""
    value = value.detach().float()
    if value.numel() == 2:
        return value[0] / value[1].clamp(min=1)
    return value.reshape(())


class DivergenceGuard:
    """The first non-finite loss or gradient norm, recorded on the device and read at sync points.

    Per step: `observe_losses` (one stack, a few elementwise kernels and one 1-element all-reduce, all queued on the
    device) returns the step's flag, agreed by every rank; the back end ORs in the gradient norm's own flag through
    `observe`. `check()` is collective and reads everything on the host once."""

    def __init__(self) -> None:
        # One slot per tuple of quantity names (the same every step in practice): first bad iteration (0 = none)
        # and the value seen then, per name.
        self._slots: Dict[Tuple[str, ...], List[torch.Tensor]] = {}
        self.iteration = 0
        self.skip: Optional[torch.Tensor] = None  # this step's flag, the same on every rank

    def observe(self, iteration: int, values: Dict[str, torch.Tensor],
                bad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Record which of `values` (name -> tensor) are NaN / Inf on this rank (or `bad`, a bool per name, when
        the rank's own share decides, as for a gradient norm summed over ranks). Returns this rank's flag."""
        names = tuple(values)
        stacked = torch.stack([scalar_value(v) for v in values.values()])
        if bad is None:
            bad = ~torch.isfinite(stacked)
        slot = self._slots.get(names)
        if slot is None:
            slot = self._slots[names] = [torch.zeros(len(names), dtype=torch.int64, device=stacked.device),
                                         torch.zeros(len(names), device=stacked.device)]
        first, seen = slot
        new = bad & (first == 0)
        slot[0] = torch.where(new, iteration, first)
        slot[1] = torch.where(new, stacked, seen)
        return bad.any()

    def observe_losses(self, iteration: int, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's losses (entries whose name holds "loss"; only the last pipeline stage has any) -> a flag
        agreed by every rank, still on the device."""
        self.iteration = iteration
        entries = {name: value for name, value in losses.items() if "loss" in name and torch.is_tensor(value)}
        flag = torch.zeros((), dtype=torch.int32, device=compat.device())
        if entries:
            flag = self.observe(iteration, entries).to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.skip = flag.bool()
        return self.skip

    def observe_grad_norm(self, norm: torch.Tensor, own_share_bad: torch.Tensor) -> torch.Tensor:
        """The global gradient norm of this step (the same on every rank); recorded against the ranks whose own
        gradients hold the NaN / Inf. Returns the step's flag: losses or norm."""
        self.observe(self.iteration, {"grad norm": norm}, own_share_bad.reshape(1))
        bad = ~torch.isfinite(norm)
        self.skip = bad if self.skip is None else self.skip | bad
        return self.skip

    def check(self) -> None:
        """Collective: raise NonFiniteError on every rank when any rank recorded a non-finite quantity. The error
        names the earliest iteration and, among the ranks that saw it then, the lowest."""
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        found = None  # (iteration, name, value) of this rank's earliest record
        if self._slots:
            host = torch.cat([torch.stack([first.double(), seen.double()]) for first, seen in self._slots.values()],
                             dim=1).tolist()
            names = [name for key in self._slots for name in key]
            for name, first, value in zip(names, host[0], host[1]):
                if first and (found is None or first < found[0]):
                    found = (int(first), name, value)
        # Earliest iteration first, then lowest rank: one MIN over iteration * world + rank.
        never = torch.iinfo(torch.int64).max
        key = torch.tensor([found[0] * world + rank if found else never], dtype=torch.int64, device=compat.device())
        torch.distributed.all_reduce(key, op=torch.distributed.ReduceOp.MIN)
        agreed = int(key.item())
        if agreed == never:
            return
        iteration, first_rank = divmod(agreed, world)
        quantity, value = (found[1], found[2]) if found and first_rank == rank else ("a loss", math.nan)
        raise NonFiniteError(quantity, value, first_rank, iteration)


class ExitConditions:
    """The run's reasons to stop early, checked collectively after each iteration (on the host)."""

    REASONS = {1: "receiving {signal}", 2: "{minutes:g} minutes of wall time"}

    def __init__(self, args, group=None) -> None:
        """`group`: a gloo group over all ranks (None: the default group, which is gloo on CPU)."""
        self.start = time.time()
        self.minutes = args.exit_duration_in_mins
        self.signal_name = args.exit_signal
        self.group = group
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
        agreed = torch.tensor([code], dtype=torch.int64)  # host memory, gloo: nothing waits for the device
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX, group=self.group)
        code = int(agreed.item())
        if not code:
            return None
        return self.REASONS[code].format(signal=self.signal_name, minutes=self.minutes)
