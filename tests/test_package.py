"""The package's import-time behaviour (megatron_cocomix/__init__.py)."""

import subprocess
import sys

from tests.helpers.paths import ROOT

PROBE = """
import sys
import pretrain_cocomix
import megatron.core.timers as timers
assert timers.wandb is None, "megatron.core imported wandb"
assert "wandb" not in sys.modules, "something imported wandb at start-up"
from megatron_cocomix.training import scalar_writers
import wandb
assert sys.modules["wandb"] is wandb and callable(wandb.init)
print("ok")
"""


def test_megatron_core_starts_without_wandb_and_wandb_still_imports():
    """Starting the trainer does not pay for megatron-core's optional wandb import; W&B logging still gets the
    real package when it asks for it."""
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
