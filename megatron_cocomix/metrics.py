"""Scalars recorded inside the model (any layer, any pipeline stage) and reduced for the log line.

Megatron's loss dictionary only exists on the last pipeline stage; a layer on another stage (a MoE router, a
CoCoMix concept layer) records its scalars here instead, as megatron-core's MoE auxiliary-loss tracker does.
It sits below both the model and the training loop (as megatron-core keeps that tracker in core): the model
records, the loop reduces, and neither imports the other.
Each metric is a running [sum, count]; `reduce()` sums them over every rank and returns sum / count. Names are
declared up front on every rank so that all ranks join the same all-reduce. A value computed identically on all
tensor-parallel ranks is recorded by TP rank 0 only (`record` does that).
"""

from __future__ import annotations

from typing import Dict, List

import torch
from megatron.core import parallel_state

from megatron_cocomix import compat

_NAMES: List[str] = []
_VALUES: Dict[str, torch.Tensor] = {}


def declare(*names: str) -> None:
    for name in names:
        if name not in _NAMES:
            _NAMES.append(name)


def record(name: str, total: torch.Tensor, count: torch.Tensor) -> None:
    """Add a (sum, count) pair; ignored on TP ranks other than 0 (their copy is identical). Accumulated on the
    device of `total`, so recording never waits for the device (the values reach the host in `reduce`)."""
    if name not in _NAMES:
        raise KeyError(f"metric {name!r} was not declared")
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return
    pair = torch.stack([total.detach().float().reshape(()), count.detach().float().reshape(()).to(total.device)])
    _VALUES[name] = _VALUES[name] + pair if name in _VALUES else pair


def reset() -> None:
    _VALUES.clear()


def reduce_on_device() -> Dict[str, torch.Tensor]:
    """Every declared metric as a [sum, count] tensor summed over all ranks, then reset; collective, and it never
    waits for the device (the all-reduce is queued like any other kernel). Read the values with `as_floats`."""
    if not _NAMES:
        return {}
    device = compat.device()
    buffer = torch.stack([_VALUES[name].to(device) if name in _VALUES else torch.zeros(2, device=device)
                          for name in _NAMES])
    torch.distributed.all_reduce(buffer)
    reset()
    return dict(zip(_NAMES, buffer.unbind(0)))


def as_floats(pairs: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """{name: [sum, count]} -> {name: sum / count} on the host (one copy), leaving out names with no count."""
    if not pairs:
        return {}
    values = torch.stack(list(pairs.values())).tolist()
    return {name: total / count for name, (total, count) in zip(pairs, values) if count > 0}


def reduce() -> Dict[str, float]:
    """Sum every declared metric over all ranks, reset, and read the averages on the host; collective."""
    return as_floats(reduce_on_device())
