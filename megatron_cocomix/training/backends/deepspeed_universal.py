"""DeepSpeed's universal checkpoint: the ZeRO optimizer state of a checkpoint, re-cut per parameter, so that a run
saved at one data-parallel size (and ZeRO stage 1 or 2) resumes at another.

DeepSpeed's own ZeRO files hold each rank's flat partition of the fp32 master weights and Adam moments, so they
reload only at the DP size they were written at. DeepSpeed's `ds_to_universal` merges the partitions into one
file per parameter and state (`zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`), and its engine, with
`checkpoint.load_universal`, cuts them again for any DP size (`_load_universal_checkpoint` of the ZeRO-1/2
optimizer). `write_universal` runs that conversion on a checkpoint of this project, once, offline:

    <checkpoint>/iter_N/deepspeed_optimizer/pp_rank_000/zero/        DeepSpeed's files (as saved)
    <checkpoint>/iter_N/deepspeed_optimizer/pp_rank_000/universal/   the universal checkpoint (written here)

The DeepSpeed back end loads `universal/` whenever the saved layout differs from the run's and the conversion is
there. Supported: ZeRO-1/2 at TP1 x PP1, to any DP size and ZeRO stage 1 or 2 (the model weights themselves load at
any layout from the dist checkpoint). Tensor-parallel merges would need DeepSpeed's per-parameter partitioning
patterns for megatron-core's layers, which are not written.

DeepSpeed 0.19.8's converter stops on the `None` entries megatron-core's linear layers keep in their state dict
(`<layer>._extra_state`, for Transformer Engine): it is given a copy of the model-states file without them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Dict, List

import torch

OPTIMIZER_DIR = "deepspeed_optimizer"
LAYOUT_FILE = "layout.json"
CHECKPOINT_TAG = "zero"
UNIVERSAL_TAG = "universal"
UNIVERSAL_STAGES = (1, 2)


def read_layout(checkpoint_dir: str) -> Dict[str, int]:
    """The layout DeepSpeed's optimizer state was saved at (<checkpoint>/deepspeed_optimizer/layout.json)."""
    path = os.path.join(checkpoint_dir, OPTIMIZER_DIR, LAYOUT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no DeepSpeed optimizer state in this checkpoint")
    with open(path) as f:
        return json.load(f)


def stage_dirs(checkpoint_dir: str) -> List[str]:
    """One directory per pipeline stage (pp_rank_XXX) under <checkpoint>/deepspeed_optimizer."""
    root = os.path.join(checkpoint_dir, OPTIMIZER_DIR)
    return sorted(os.path.join(root, n) for n in os.listdir(root) if n.startswith("pp_rank_"))


def has_universal(checkpoint_dir: str) -> bool:
    dirs = stage_dirs(checkpoint_dir) if os.path.isdir(os.path.join(checkpoint_dir, OPTIMIZER_DIR)) else []
    return bool(dirs) and all(os.path.isdir(os.path.join(d, UNIVERSAL_TAG)) for d in dirs)


def universal_refusal(layout: Dict[str, int]) -> str:
    """Why a checkpoint saved at `layout` cannot go through a universal checkpoint here, or ''."""
    if layout["zero_stage"] not in UNIVERSAL_STAGES:
        return f"ZeRO stage {layout['zero_stage']} (universal checkpoints here: ZeRO-1 and ZeRO-2)"
    if (layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]) != (1, 1):
        return (f"TP{layout['tensor_model_parallel_size']} x PP{layout['pipeline_model_parallel_size']} (universal "
                f"checkpoints here: TP1 x PP1)")
    return ""


def _model_states_without_none(src: str, dst: str) -> None:
    state = torch.load(src, map_location="cpu", weights_only=False)
    state["module"] = {k: v for k, v in state["module"].items() if v is not None}
    torch.save(state, dst)


def write_universal(checkpoint_dir: str, workers: int = 1) -> List[str]:
    """Convert every pipeline stage's DeepSpeed ZeRO files of `checkpoint_dir` (an iter_XXXXXXX directory) into a
    universal checkpoint beside them; returns the directories written. Already converted stages are left alone.
    Each stage is written to a temporary directory first and renamed, so a conversion cut short leaves nothing
    the trainer reads. Errors: one-line ValueError / FileNotFoundError."""
    from deepspeed.checkpoint import ds_to_universal

    layout = read_layout(checkpoint_dir)
    refusal = universal_refusal(layout)
    if refusal:
        raise ValueError(f"{os.path.join(checkpoint_dir, OPTIMIZER_DIR)}: saved at {refusal}")
    written = []
    for stage in stage_dirs(checkpoint_dir):
        final = os.path.join(stage, UNIVERSAL_TAG)
        if os.path.isdir(final):
            continue
        source = os.path.join(stage, CHECKPOINT_TAG)
        if not os.path.isdir(source):
            raise FileNotFoundError(f"{source}: missing (the DeepSpeed optimizer state is incomplete)")
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        staged = os.path.join(tmp, "input")
        os.makedirs(staged)
        for name in os.listdir(source):
            if name.endswith("_model_states.pt"):
                _model_states_without_none(os.path.join(source, name), os.path.join(staged, name))
            else:
                os.symlink(os.path.abspath(os.path.join(source, name)), os.path.join(staged, name))
        output = os.path.join(tmp, "output")
        ds_to_universal.main(argparse.Namespace(
            input_folder=staged, output_folder=output, num_extract_workers=workers, num_merge_workers=workers,
            keep_temp_folder=False, strict=True, inject_missing_state=True))
        os.replace(output, final)
        shutil.rmtree(tmp, ignore_errors=True)
        written.append(final)
    return written
