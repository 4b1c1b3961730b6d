"""Counting, on any device, the calls that make the host wait for a GPU: a tool for keeping the training step free
of them.

On a GPU, the host queues kernels and runs ahead; it waits only when it needs a value the device computes. In
a training step that wait stalls the queue, and the GPU idles while the host catches up. `torch.cuda.set_sync_
debug_mode("error")` finds such calls on a GPU; `HostSyncCounter` finds the same calls on a CPU run, so a test of
the step's code path can run without a GPU:

- a tensor's value read as a Python number: `.item()`, `float()`, `int()`, `bool()` (and `if tensor:`), which
  all dispatch to aten's `_local_scalar_dense`; `.tolist()`, `.numpy()`, `.cpu()`;
- ops whose output shape depends on the data (`nonzero`, `masked_select`, boolean-mask indexing, `unique`,
  `repeat_interleave` with tensor repeats), which must learn that shape on the host.

It does not see copies that would cross devices only on a GPU (a CPU run has no second device).

    with HostSyncCounter() as syncs:
        train_step(...)
    assert not syncs.count, syncs.report()
"""

from __future__ import annotations

import collections
import os
import traceback
from typing import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                       "unique_consecutive", "unique_dim"}
_HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}
_TORCH_DIR = os.path.dirname(torch.__file__)


def _call_site() -> str:
    """The innermost frame outside torch, this module and any other torch mode: who asked for the value."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if (not frame.filename.startswith(_TORCH_DIR) and frame.filename != __file__
                and frame.name not in ("__torch_function__", "__torch_dispatch__")):
            return f"{frame.filename}:{frame.lineno}"
    return "<unknown>"


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, owner: "HostSyncCounter") -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.owner.ops[name] += 1
        if name in _DATA_DEPENDENT_OPS or _is_data_dependent(name, func, args):
            self.owner.record(name)
        return func(*args, **kwargs)


def _is_data_dependent(name: str, func, args) -> bool:
    if name == "repeat_interleave" and func._overloadname == "Tensor":
        return True
    if name in ("index", "index_put", "index_put_"):  # boolean masks become indices via nonzero
        indices = args[1] if len(args) > 1 else ()
        masked = any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices or () if i is not None)
        # `x[mask] = scalar` runs as masked_fill_, which needs no index list.
        scalar_fill = name != "index" and len(args) > 2 and torch.is_tensor(args[2]) and args[2].dim() == 0
        return masked and not scalar_fill
    return False


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, owner: "HostSyncCounter") -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.owner.record(func.__name__)
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """Context manager: `count` host waits, `sites` {(op, file:line): count}, `ops` aten ops dispatched by name."""

    def __init__(self) -> None:
        self.count = 0
        self.sites: Counter = collections.Counter()
        self.ops: Counter = collections.Counter()
        self._modes = [_FunctionCounter(self), _DispatchCounter(self)]

    def record(self, op: str) -> None:
        self.count += 1
        self.sites[(op, _call_site())] += 1

    def report(self) -> str:
        return "\n".join(f"{n:4d} x {op} at {site}" for (op, site), n in self.sites.most_common())

    def __enter__(self) -> "HostSyncCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
