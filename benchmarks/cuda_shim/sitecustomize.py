"""Benchmark-only workarounds, active when this folder is on PYTHONPATH (benchmarks/gpu_run.sh with SHIM=1).

1. 
megatron_cocomix/model/concept_mixing.py records the metric "concept dead columns" with a count made by
`torch.tensor(float(self.num_concepts))` (a CPU tensor), and megatron_cocomix/training/metrics.py `record`
stacks it with the CUDA `total`: on a GPU every CoCoMix forward fails with "Expected all tensors to be on the
same device ... (when checking argument in method wrapper_CUDA_cat)". Until the project fixes it, this wraps
`metrics.record` when that module is first imported so that `count` is moved to `total`'s device; nothing else
changes (the per-call .cpu() copy stays, so the timing is the project's). A no-op on CPU.

2. megatron_cocomix/model/concept_mixing.py `sparse_compress` calls F.embedding_bag(..., per_sample_weights=...)
on the bf16 compression weight; PyTorch has no CUDA backward for that in bf16 ("_embedding_bag_per_sample_weights
_backward_cuda" not implemented for 'BFloat16'), so every --bf16 CoCoMix step fails in backward. The wrapper
below runs that one call in fp32 on CUDA (weight and per-sample weights upcast, result cast back to bf16);
elsewhere torch.nn.functional.embedding_bag is unchanged. Installed when metrics is imported (torch is loaded
then, and concept_mixing imports metrics before any forward).
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "megatron_cocomix.training.metrics"


def _patch(module):
    import torch

    original = module.record

    def record(name, total, count):
        if isinstance(total, torch.Tensor) and isinstance(count, torch.Tensor) and count.device != total.device:
            count = count.to(total.device)
        return original(name, total, count)

    record.__doc__ = original.__doc__
    record.benchmark_shim = True
    module.record = record

    import torch.nn.functional as F

    embedding_bag = F.embedding_bag

    def embedding_bag_fp32_on_cuda(input, weight, *args, **kwargs):
        psw = kwargs.get("per_sample_weights")
        if psw is not None and weight.is_cuda and weight.dtype == torch.bfloat16:
            kwargs["per_sample_weights"] = psw.float()
            return embedding_bag(input, weight.float(), *args, **kwargs).to(weight.dtype)
        return embedding_bag(input, weight, *args, **kwargs)

    embedding_bag_fp32_on_cuda.benchmark_shim = True
    F.embedding_bag = embedding_bag_fp32_on_cuda


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _Finder())
