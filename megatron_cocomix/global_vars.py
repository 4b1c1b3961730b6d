"""Run-wide singletons, as in Megatron-LM: the resolved arguments, the tokenizer and the online teacher.

`model_provider` and `forward_step` keep Megatron's signatures (no `args` parameter), so they read these.
`pretrain()` resolves every derived value, freezes the arguments, then publishes them here; `reset_global_vars`
clears everything, so that several runs can share one process (tests do).
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

_ARGS: Optional[argparse.Namespace] = None
_TOKENIZER: Any = None
_TEACHER: Any = None


def set_args(args: argparse.Namespace) -> None:
    global _ARGS
    _ARGS = args


def get_args() -> argparse.Namespace:
    if _ARGS is None:
        raise RuntimeError("arguments are not parsed yet: call pretrain() or set_args() first")
    return _ARGS


def set_tokenizer(tokenizer: Any) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def get_tokenizer() -> Any:
    if _TOKENIZER is None:
        raise RuntimeError("tokenizer is not built yet")
    return _TOKENIZER


def set_teacher(teacher: Any) -> None:
    """The frozen teacher a run's training step queries (online concept labels, KD): loads its weights lazily,
    on the ranks that use it."""
    global _TEACHER
    _TEACHER = teacher


def get_teacher() -> Any:
    if _TEACHER is None:
        raise RuntimeError("this run has no teacher (--teacher-model with --cocomix online labels or --kd)")
    return _TEACHER


def reset_global_vars() -> None:
    global _ARGS, _TOKENIZER, _TEACHER
    _ARGS = _TOKENIZER = _TEACHER = None
