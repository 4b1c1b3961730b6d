"""Counting large allocations on CPU: which ops create a new fp32 storage of at least a given size."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargeAllocations(TorchDispatchMode):
    """Records (in `ops`) every op whose fp32 output of at least `nbytes` is a new storage: not a view of, nor
    written in place into, one of the op's inputs. Inside the mode, backward ops are seen too."""

    def __init__(self, nbytes: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.nbytes, self.dtype, self.ops = nbytes, dtype, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == self.dtype:
                storage = tensor.untyped_storage()
                if storage.nbytes() >= self.nbytes and storage.data_ptr() not in inputs:
                    self.ops.append(str(func))
        return out
