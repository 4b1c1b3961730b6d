"""CoCoMix (continuous concept mixing) pretraining on megatron-core; docs/design.md says what the code implements.

Start-up time: megatron-core's inference context and timers run `try: import wandb` at import time only to learn
whether it is installed. With wandb installed that import costs ~1.5 s in every process (every rank, every tool),
for code paths this project never takes: its own W&B writer (training/scalar_writers.py) imports wandb when
--wandb-project asks for it. So importing this package first makes `import wandb` issued by a megatron.core module
report wandb as absent; every other importer, ours included, gets the real package.
"""

from __future__ import annotations

import importlib.abc
import sys


class _HideWandbFromMegatronCore(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "wandb":
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
            frame = frame.f_back  # the import machinery's own frames; the next one holds the import statement
        importer = frame.f_globals.get("__name__", "") if frame is not None else ""
        if importer == "megatron.core" or importer.startswith("megatron.core."):
            raise ModuleNotFoundError("wandb is not imported by megatron.core here", name="wandb")
        return None


if not any(isinstance(finder, _HideWandbFromMegatronCore) for finder in sys.meta_path):
    sys.meta_path.insert(0, _HideWandbFromMegatronCore())
