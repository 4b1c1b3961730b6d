"""Where the training scalars go: tensorboard and Weights & Biases, behind one interface.

The logger hands every scalar to a `ScalarWriters` fan-out once, so the two trackers cannot disagree on names,
steps or values. Both live on the last rank only (it holds the losses on every layout), as in Megatron-LM.

Scalars are stepped by iteration. The "<tag> vs samples" curves are stepped by consumed samples in tensorboard
(Megatron's tags); a W&B history has one monotonic step, so there the same value is logged at its iteration
together with `samples vs steps` (Megatron-LM's W&B key for consumed samples), which `define_metric` makes the
x axis of that curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Dict, List

SAMPLES_KEY = "samples vs steps"


class ScalarWriter:
    """One tracker."""

    def add_scalar(self, tag: str, value: float, iteration: int) -> None:
        raise NotImplementedError

    def add_scalar_vs_samples(self, tag: str, value: float, iteration: int, consumed_samples: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorboardWriter(ScalarWriter):
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir, max_queue=1000)

    def add_scalar(self, tag: str, value: float, iteration: int) -> None:
        self.writer.add_scalar(tag, value, iteration)

    def add_scalar_vs_samples(self, tag: str, value: float, iteration: int, consumed_samples: int) -> None:
        self.writer.add_scalar(f"{tag} vs samples", value, consumed_samples)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def wandb_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's resolved arguments as W&B config (Megatron-LM logs vars(args)); shapes become dicts."""
    config = {}
    for key, value in vars(args).items():
        if key.startswith("_"):
            continue
        config[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return config


def wandb_init_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """wandb.init's arguments. Without --wandb-mode, wandb decides (WANDB_MODE, `wandb offline`, else online)."""
    kwargs = {"dir": args.wandb_save_dir, "name": args.wandb_exp_name, "project": args.wandb_project,
              "config": wandb_config(args)}
    if args.wandb_entity:
        kwargs["entity"] = args.wandb_entity
    if args.wandb_mode:
        kwargs["mode"] = args.wandb_mode
    return kwargs


class WandbWriter(ScalarWriter):
    def __init__(self, args: argparse.Namespace):
        import wandb  # only with --wandb-project: runs without it never need wandb installed

        kwargs = wandb_init_kwargs(args)
        os.makedirs(kwargs["dir"], exist_ok=True)
        try:
            self.run = wandb.init(**kwargs)
        except wandb.errors.Error as e:
            # No API key or no network (online mode gives up after wandb's init timeout): one line, not a trace.
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"--wandb-project {args.wandb_project}: wandb.init failed: {reason} (without network "
                             f"use --wandb-mode offline or WANDB_MODE=offline, then `wandb sync`)") from None
        self._vs_samples: set = set()

    def add_scalar(self, tag: str, value: float, iteration: int) -> None:
        self.run.log({tag: value}, step=iteration)

    def add_scalar_vs_samples(self, tag: str, value: float, iteration: int, consumed_samples: int) -> None:
        name = f"{tag} vs samples"
        if name not in self._vs_samples:
            self._vs_samples.add(name)
            self.run.define_metric(name, step_metric=SAMPLES_KEY)
        self.run.log({name: value, SAMPLES_KEY: consumed_samples}, step=iteration)

    def close(self) -> None:
        self.run.finish()


class ScalarWriters(ScalarWriter):
    """Fan-out to every configured tracker; empty (and false) when there is none."""

    def __init__(self, writers: List[ScalarWriter]):
        self.writers = writers

    def __bool__(self) -> bool:
        return bool(self.writers)

    def add_scalar(self, tag: str, value: float, iteration: int) -> None:
        for writer in self.writers:
            writer.add_scalar(tag, value, iteration)

    def add_scalar_vs_samples(self, tag: str, value: float, iteration: int, consumed_samples: int) -> None:
        for writer in self.writers:
            writer.add_scalar_vs_samples(tag, value, iteration, consumed_samples)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def build_scalar_writers(args: argparse.Namespace) -> ScalarWriters:
    """The trackers the flags ask for: --tensorboard-dir, --wandb-project."""
    writers: List[ScalarWriter] = []
    if args.tensorboard_dir:
        writers.append(TensorboardWriter(args.tensorboard_dir))
    if args.wandb_project:
        writers.append(WandbWriter(args))
    return ScalarWriters(writers)
