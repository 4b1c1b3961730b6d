"""Everything megatron-core needs to run on a machine without CUDA; does nothing when CUDA is available.

megatron-core 0.16 assumes a GPU in a few dozen places: tensors created with `device="cuda"` or
`torch.cuda.current_device()`, `tensor.cuda()`, CUDA RNG states in the tensor-parallel RNG tracker, stream and
event objects, and optimizer checks of `param.type() == "torch.cuda.FloatTensor"`. Rather than forking those
files, `install()` makes them work unchanged on CPU (gloo), so tests and laptops run the very code paths that
run on GPU clusters:

1. A global `TorchFunctionMode` rewrites CUDA device arguments (`"cuda"`, `"cuda:N"`, `torch.device("cuda")`,
   a bare device index) to CPU, makes `Tensor.cuda()` the identity, and, for callers inside
   `megatron.core.optimizer` only, reports CPU tensor types under their CUDA names (the mixed-precision
   optimizers use the type string to tell model dtypes apart; the dtype itself is what matters).
2. `torch.cuda` stand-ins for the calls that fail without a CUDA build (`current_device`, `synchronize`,
   streams, events, nvtx ranges, memory statistics).
   The autograd engine does not carry Python modes into backward, so the backward of Python-defined
   autograd Functions (megatron's sequence-parallel and tensor-parallel ones) runs under the mode too.
3. The tensor-parallel RNG tracker keeps named CPU generator states, so seeding, dropout under tensor
   parallelism and activation recomputation (which replays the RNG) behave as on GPU.

Cost: a few microseconds per torch call on CPU, irrelevant for the tiny models CPU runs are for.

Activation is explicit: every entry point (`pretrain()`, tools and test workers that build megatron-core
objects) calls `install()` first; nothing installs it as a side effect of an import or of process-group set-up.
It is idempotent. The patches follow megatron-core's internals, so `install()` refuses any megatron-core other
than the release they were written against (MEGATRON_CORE_VERSION).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
MEGATRON_CORE_VERSION = "0.16."  # the release line the patches below were written and tested against


def cuda_available() -> bool:
    return torch.cuda.is_available()


def can_deallocate_pipeline_outputs() -> bool:
    """megatron frees a pipeline stage's output storage right after posting its send. NCCL orders the send
    before any reuse on the stream; gloo sends asynchronously from the CPU tensor, which would then read
    freed storage (seen as wrong or NaN losses under the interleaved schedule). Keep outputs on CPU."""
    return cuda_available()


def device() -> torch.device:
    """The device models and batches live on: the local GPU, or the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    # A bare int means "cuda:<int>" to torch factory functions.
    return isinstance(value, int) and not isinstance(value, bool)


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            frame = sys._getframe(1)
            while frame.f_back is not None and frame.f_code.co_name == "__torch_function__":  # another mode above
                frame = frame.f_back
            caller = frame.f_globals.get("__name__", "")
            if caller.startswith("megatron.core.optimizer") and not name.startswith("torch.cuda."):
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _Stream:
    """Stand-in for torch.cuda.Stream: CPU work is synchronous, so every wait is already satisfied."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self):
        pass

    def query(self):
        return True


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _Nvtx:
    @staticmethod
    def range_push(msg):
        pass

    @staticmethod
    def range_pop():
        pass

    @staticmethod
    @contextlib.contextmanager
    def range(msg, *args, **kwargs):
        yield


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda device=None: None
    cuda.current_stream = lambda device=None: _Stream()
    cuda.default_stream = lambda device=None: _Stream()
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.nvtx = _Nvtx
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.set_device = lambda device: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    class CpuRNGStatesTracker(tp_random.CudaRNGStatesTracker):
        """Named RNG states kept as CPU generator states (the CUDA tracker's semantics, on torch's CPU RNG)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    tp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    tp_random.initialize_rng_tracker(force_reset=True)


def _patch_custom_function_backward() -> None:
    """The autograd engine runs backward without the Python mode stack, and megatron's custom autograd
    Functions (sequence-parallel gathers, async TP linear) allocate CUDA buffers in `backward`: run the
    backward of Python-defined Functions under the same mode."""
    from torch.autograd.function import BackwardCFunction

    original_apply = BackwardCFunction.apply

    def apply(self, *args):
        with _CudaToCpuMode():
            return original_apply(self, *args)

    BackwardCFunction.apply = apply


def check_megatron_core_version() -> None:
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if not version.startswith(MEGATRON_CORE_VERSION):
        raise RuntimeError(f"megatron_cocomix.compat was written for megatron-core {MEGATRON_CORE_VERSION}x, found "
                           f"{version}: its CPU patches may not match (install the pinned requirements.txt)")


def is_installed() -> bool:
    return _INSTALLED


def install() -> None:
    """Make megatron-core run on CPU. A no-op when CUDA is available or when already installed."""
    global _INSTALLED
    if _INSTALLED or cuda_available():
        return
    check_megatron_core_version()
    _patch_torch_cuda()
    _patch_rng_tracker()
    # Entered for the life of the process: every thread that calls torch sees it. Modes are per-thread, so
    # autograd's CPU backward (which runs on the calling thread) is covered.
    _CudaToCpuMode().__enter__()
    _patch_custom_function_backward()
    _INSTALLED = True
