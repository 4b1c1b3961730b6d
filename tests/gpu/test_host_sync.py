"""No host synchronisation inside a training step: between log intervals the host queues work and never waits for
the device (a `.item()`, a blocking copy, a data-dependent shape would each stall it once per step).

The tiny student trains 6 iterations in bf16 in this process through `pretrain()` (tests/helpers/in_process.py),
with the log line at iteration 6 only, no evaluation and no checkpoint. Its `forward_step` is pretrain_cocomix's,
wrapped: at the first forward of iteration 2 it sets `torch.cuda.set_sync_debug_mode("error")`, at the first
forward of iteration 6 it sets it back, so every synchronising CUDA call of iterations 2-5 (batch reading, forward,
backward, gradient reduction, the optimizer step, loss and metric bookkeeping, the loop) raises where it is made.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.gpu_runs import tiny_cocomix, tiny_student
from tests.helpers.in_process import train_in_process

pytestmark = pytest.mark.gpu

ITERATIONS = 6
CHECKED = (2, 5)  # the iterations whose whole step runs with synchronisations raising


class SyncsRaise:
    """forward_step wrapper: host synchronisations raise from the first forward of iteration CHECKED[0] to the first
    forward of iteration CHECKED[1] + 1 (one micro-batch per iteration)."""

    def __init__(self, forward_step):
        self.forward_step = forward_step
        self.calls = 0
        self.window = []  # the iterations at which the mode was switched on, then off

    def __call__(self, data_iterator, model):
        self.calls += 1
        if self.calls in (CHECKED[0], CHECKED[1] + 1):
            torch.cuda.set_sync_debug_mode("error" if self.calls == CHECKED[0] else "default")
            self.window.append(self.calls)
        return self.forward_step(data_iterator, model)


@pytest.mark.parametrize("method", ["ntp", "cocomix"])
def test_no_host_sync_inside_a_training_step(method, quickstart, tiny_assets, single_process):
    import pretrain_cocomix

    flags = tiny_student(quickstart, ITERATIONS, bf16=True) + ["--log-interval", str(ITERATIONS)]
    if method == "cocomix":
        flags += tiny_cocomix(tiny_assets)
    checked = SyncsRaise(pretrain_cocomix.forward_step)
    try:
        summary = train_in_process(flags, forward_step=checked)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert checked.window == [CHECKED[0], CHECKED[1] + 1] and summary["iteration"] == ITERATIONS
