"""Durable, atomic directory writes shared by checkpoints, exports and converted teachers: a reader sees the old
directory or the complete new one, never a half-written one, even across a crash."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under `path`."""
    for directory, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(directory)


def replace_dir(finished: str, target: str, old: str) -> None:
    """Move the finished directory to `target`; an existing `target` is first renamed to `old`, then deleted."""
    if os.path.exists(target):
        os.rename(target, old)
        os.rename(finished, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(finished, target)


@contextlib.contextmanager
def publishing_dir(output: str) -> Iterator[str]:
    """Yields a fresh temporary sibling of `output` to write into; when the block ends normally the directory
    replaces `output` (`replace_dir`), and when it raises it is removed and `output` is left as it was."""
    parent = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(output))}.tmp-")
    try:
        yield tmp
        replace_dir(tmp, output, f"{tmp}.old")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
