"""Checkpoints with megatron-core dist_checkpointing (torch_dist), loadable at any TP / PP layout.

Layout (Megatron's): <save>/iter_0000100/ (sharded tensors + common state) and <save>/latest_checkpointed_iteration.txt.
"""

from __future__ import annotations

import argparse
import os

import torch
from megatron.core import dist_checkpointing, parallel_state

TRACKER = "latest_checkpointed_iteration.txt"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _model_sharded_state_dict(model) -> dict:
    if len(model) == 1:
        return {"model": model[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model)}


def save_checkpoint(args: argparse.Namespace, iteration: int, model, backend, state: dict) -> None:
    path = checkpoint_dir(args.save, iteration)
    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    sharded = _model_sharded_state_dict(model)
    sharded.update(iteration=iteration, consumed_train_samples=state["consumed_train_samples"])
    dist_checkpointing.save(sharded, path)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(args.save, TRACKER), "w") as f:
            f.write(str(iteration))


def load_checkpoint(args: argparse.Namespace, model, backend) -> dict:
    with open(os.path.join(args.load, TRACKER)) as f:
        iteration = int(f.read().strip())
    path = checkpoint_dir(args.load, iteration)
    sharded = _model_sharded_state_dict(model)
    sharded.update(iteration=0, consumed_train_samples=0)
    loaded = dist_checkpointing.load(sharded, path)
    for i, chunk in enumerate(model):
        chunk.load_state_dict(loaded["model" if len(model) == 1 else f"model{i}"])
    return {"iteration": loaded["iteration"], "consumed_train_samples": loaded["consumed_train_samples"]}
