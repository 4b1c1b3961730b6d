"""Checkpoint directories in tests: copy one iteration out of a run's --save, read the tracker, read the losses
a run logged per iteration."""

from __future__ import annotations

import os
import shutil

TRACKER = "latest_checkpointed_iteration.txt"


def checkpoint_copy(src_root: str, iteration: int, dst_root: str) -> str:
    """A new checkpoint root holding only iteration `iteration` of src_root, with its own tracker naming it (a run
    resumes from there, from the middle of the run that saved it)."""
    os.makedirs(dst_root)
    name = f"iter_{int(iteration):07d}"
    shutil.copytree(os.path.join(src_root, name), os.path.join(dst_root, name))
    with open(os.path.join(dst_root, TRACKER), "w") as f:
        f.write(str(iteration))
    return dst_root


def tracker(root) -> int:
    with open(os.path.join(str(root), TRACKER)) as f:
        return int(f.read())


def history(summary: dict, key: str = "lm loss") -> dict:
    """{iteration: value} of what a run logged (skipped fp16 iterations log no loss)."""
    return {entry["iteration"]: entry[key] for entry in summary["train_history"] if key in entry}
