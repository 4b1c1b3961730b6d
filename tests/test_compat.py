"""megatron_cocomix/compat.py, directly: each patch does what its docstring says, install() is idempotent,
refuses another megatron-core release, and does nothing when CUDA is available.

install() changes the process for good, so each case runs in a fresh interpreter."""

import subprocess
import sys
import textwrap

from tests.helpers.launch import ROOT
from tests.helpers.launch import test_env as subprocess_env

PATCHES = """
import megatron.core
import torch
from megatron_cocomix import compat

# Refused before anything is patched when megatron-core is another release.
real = megatron.core.__version__
megatron.core.__version__ = "0.99.0"
try:
    compat.install()
except RuntimeError as e:
    assert "0.99.0" in str(e) and not compat.is_installed(), e
else:
    raise AssertionError("install() accepted megatron-core 0.99.0")
megatron.core.__version__ = real

compat.install()
compat.install()  # idempotent: one mode on the stack, the same stand-ins
from torch.overrides import _get_current_function_mode_stack
modes = [m for m in _get_current_function_mode_stack() if type(m).__name__ == "_CudaToCpuMode"]
assert len(modes) == 1, modes
assert compat.is_installed()

# 1. CUDA device arguments become CPU; Tensor.cuda() is the identity; .to("cuda") stays on CPU.
assert torch.empty(2, device="cuda").device.type == "cpu"
assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
assert torch.ones(2, device=0).device.type == "cpu"
t = torch.arange(3.0)
assert t.cuda() is t and t.to("cuda:0").device.type == "cpu"
# ... and megatron's optimizer, only, sees CUDA type names (it tells model dtypes apart by them).
seen = {}
exec("seen['type'] = t.type()", {"__name__": "megatron.core.optimizer.optimizer", "t": t, "seen": seen})
assert seen["type"] == "torch.cuda.FloatTensor", seen
assert t.type() == "torch.FloatTensor"

# 2. torch.cuda stand-ins.
assert torch.cuda.current_device() == 0 and torch.cuda.synchronize() is None
stream, event = torch.cuda.current_stream(), torch.cuda.Event()
stream.wait_stream(stream); event.record(); assert event.query() and stream.query()
assert torch.cuda.memory_allocated() == 0 and torch.cuda.max_memory_allocated() == 0
assert torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
with torch.cuda.nvtx.range("x"):
    pass

# 3. The tensor-parallel RNG tracker keeps named CPU generator states.
from megatron.core import tensor_parallel
tracker = tensor_parallel.get_cuda_rng_tracker()
assert type(tracker).__name__ == "CpuRNGStatesTracker", type(tracker)
tracker.add("test-stream", 5)
torch.manual_seed(0)
outside_expected = torch.randn(3, generator=torch.Generator().manual_seed(0))
with tracker.fork("test-stream"):
    first = torch.randn(4)
with tracker.fork("test-stream"):
    second = torch.randn(4)
reference = torch.Generator().manual_seed(5)
assert torch.equal(first, torch.randn(4, generator=reference)), "fork does not draw from the named stream"
assert torch.equal(second, torch.randn(4, generator=reference)), "the named stream did not advance"
assert torch.equal(torch.randn(3), outside_expected), "fork disturbed the default stream"

# 4. Backward of Python autograd Functions runs under the mode (it may allocate on "cuda").
class CudaBuffers(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.full_like(grad, 2.0, device="cuda")

x = torch.ones(3, requires_grad=True)
CudaBuffers.apply(x).sum().backward()
assert torch.equal(x.grad, torch.full((3,), 2.0))
print("compat ok")
"""

WITH_CUDA = """
import torch
torch.cuda.is_available = lambda: True
current_device = torch.cuda.current_device
from megatron_cocomix import compat
compat.install()
assert not compat.is_installed()
assert torch.cuda.current_device is current_device
from torch.overrides import _get_current_function_mode_stack
assert not _get_current_function_mode_stack()
print("no-op ok")
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_each_patch_does_what_it_says():
    assert "compat ok" in _run(PATCHES)


def test_install_is_a_no_op_when_cuda_is_available():
    assert "no-op ok" in _run(WITH_CUDA)
