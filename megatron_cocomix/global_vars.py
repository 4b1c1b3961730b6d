"""Run-wide singletons, as in Megatron-LM: the parsed arguments and the tokenizer.

`model_provider` and `forward_step` keep Megatron's signatures (no `args` parameter), so they read these.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

_ARGS: Optional[argparse.Namespace] = None
_TOKENIZER: Any = None


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
