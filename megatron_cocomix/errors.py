"""The command-line contract for bad input: one `error: ...` line on stderr naming the flag, file or value, and
exit status 2 (argparse's own status for a bad flag). Every entry point (pretrain, each tool) uses this.

Validators raise ValueError (or a subclass: ArgumentError, CheckpointError, ...) or FileNotFoundError with a
one-line message; nothing else is turned into an error line, so genuine bugs keep their traceback.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Callable, Iterator

BAD_INPUT = (ValueError, FileNotFoundError)
EXIT_BAD_INPUT = 2


def report(error: BaseException) -> int:
    """Print the one-line error and return the exit status for it."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


@contextlib.contextmanager
def exit_on_bad_input() -> Iterator[None]:
    """Inside the block, a bad-input error ends the process with its one line and exit status 2."""
    try:
        yield
    except BAD_INPUT as e:
        raise SystemExit(report(e)) from None


def cli_main(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a tool's `main(argv) -> int`: a bad-input error returns 2 after its one line."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except BAD_INPUT as e:
            return report(e)
    return wrapped
