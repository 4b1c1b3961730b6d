"""The optimizer back-end protocol: what the training loop, checkpointing and logging may ask of an optimizer.

A back end owns the model wrappers the schedule runs (`model`), the optimizer and megatron-core's LR / weight
decay schedule (`scheduler`). Nothing outside `training/backends/` knows which back end runs: a new one (FSDP2,
say) is one new module implementing `OptimizerBackend` and one line in `build_optimizer_backend`.

One iteration, as the loop drives it:

    backend.zero_grad()
    megatron schedule: forward / backward of every micro-batch
    backend.after_forward_backward()        # reductions the schedule did not do
    applied, grad_norm = backend.step(guard)  # clip, update, LR step (not when fp16 overflowed)

`guard` (exit_conditions.DivergenceGuard, None without --check-for-nan-in-loss-and-grad) holds the step's
non-finite-loss flag on the device; a back end keeps a diverged update off the weights, on the device where it can.
The gradient norm may be returned as a device tensor: the logger reads it at its next sync point.

Checkpoints (training/checkpointing.py) hold the model weights in megatron's dist_checkpointing format for every
back end. A back end adds its optimizer state either as sharded entries of that same checkpoint
(`optimizer_sharded_state`) or as files of its own under the checkpoint directory (`save_optimizer_files`), and
says which saved states it can load (`check_optimizer_loadable`).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import ContextManager, Dict, List, Optional, Tuple

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def build_scheduler(args: argparse.Namespace, optimizer) -> OptimizerParamScheduler:
    """megatron-core's schedule: linear warmup, then constant / linear / cosine decay to --min-lr; constant
    weight decay. Stepped once per applied update, whatever the back end."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )


class OptimizerBackend:
    """Base class and protocol. Subclasses set `name`, `model`, `optimizer` and `scheduler` in __init__."""

    name: str = ""
    model: List[torch.nn.Module]
    scheduler: OptimizerParamScheduler

    # ---- one iteration -------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        raise NotImplementedError

    def after_forward_backward(self) -> None:
        """Called once the schedule has run every micro-batch's backward."""

    def step(self, guard=None) -> Tuple[bool, Optional[object]]:
        """(update applied, gradient norm before clipping: a float or a 0-d device tensor). A skipped update
        (fp16 overflow) skips the LR step."""
        raise NotImplementedError

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def loss_scale(self):
        """The current loss scale: a float, or a device tensor the logger reads at its next sync point."""
        return 1.0

    # ---- parameters ----------------------------------------------------------------------------------
    def full_parameters(self, modify: bool = False) -> ContextManager:
        """Inside the block every parameter holds its full (tensor-parallel-local) value, for building a state
        dict or loading into one; with modify=True values written inside are kept. A no-op unless the back end
        shards parameters over data-parallel ranks."""
        return contextlib.nullcontext()

    def local_parameter_count(self) -> int:
        """Parameters of this rank's model chunks, counted at their full (unsharded over DP) size."""
        return sum(p.numel() for chunk in self.model for p in chunk.parameters())

    def reload_model_params(self) -> None:
        """Model weights were loaded without optimizer state: refresh any copy of them the optimizer keeps."""

    # ---- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_metadata(self) -> Dict[str, object]:
        """Plain values saved in the checkpoint's common state, read back by `check_optimizer_loadable`."""
        return {"optimizer_backend": self.name}

    def check_optimizer_loadable(self, common: dict, saved_layout: Dict[str, int],
                                 layout: Dict[str, int]) -> Optional[str]:
        """Why the optimizer state saved with `common` cannot load into this back end at `layout`, or None.
        The reason is one sentence; the caller names the checkpoint and suggests --no-load-optim."""
        saved = common.get("optimizer_backend")
        if saved != self.name:
            return f"it holds {saved} optimizer state, this run uses {self.name}"
        return None

    def optimizer_sharded_state(self, model_sharded_state: dict, common: Optional[dict] = None) -> dict:
        """Entries added to the dist checkpoint beside the model: {} when the state lives in files of the back
        end's own. `common` is given when loading (the saved common state), None when saving."""
        return {}

    def save_optimizer_files(self, checkpoint_dir: str) -> None:
        """Collective: write optimizer state kept outside the dist checkpoint, under checkpoint_dir."""

    def load_optimizer_state(self, loaded: dict, checkpoint_dir: str) -> None:
        """Collective: restore the optimizer from `loaded` (the dist checkpoint's entries that
        `optimizer_sharded_state` asked for) and / or from files under checkpoint_dir."""
