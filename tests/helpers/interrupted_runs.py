"""Runs that tests interrupt (signals, kills, restarts): their flags, and reading what they print as they go."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Dict

from tests.helpers.launch import TINY_GPT

ITERATION = re.compile(r"\] iteration\s+(\d+)/")
LM_LOSS = re.compile(r"\] iteration\s+(\d+)/.*\| lm loss: (\S+) \|")
LOADED = re.compile(r"loaded checkpoint \S+ \(.*\) at iteration (\d+)")


def flags(**overrides) -> list:
    """TINY_GPT with some values replaced; long enough to be interrupted (a 200-iteration schedule), no
    validation, a log line per iteration. A value of None adds a bare flag."""
    values = {"--train-iters": "200", "--eval-iters": "0", "--log-interval": "1", **overrides}
    out, skip = [], False
    for token in TINY_GPT:
        if skip:
            skip = False
            continue
        if token in values:
            out += [token, values.pop(token)]
            skip = True
        else:
            out.append(token)
    for key, value in values.items():
        out += [key] if value is None else [key, value]
    return out


def printed_losses(stdout: str) -> Dict[int, str]:
    """{iteration: lm loss as printed} (7 significant digits, compared digit for digit)."""
    return {int(i): value for i, value in LM_LOSS.findall(stdout)}


def read_until(proc: subprocess.Popen, predicate, timeout: float = 240) -> str:
    """Lines of proc's stdout up to and including the first one for which predicate(line) holds."""
    seen, deadline = "", time.time() + timeout
    for line in proc.stdout:
        seen += line
        if predicate(line):
            return seen
        assert time.time() < deadline, seen[-2000:]
    raise AssertionError(f"the run ended before the awaited line:\n{seen[-3000:]}")


def wait_for_iteration(proc: subprocess.Popen, at_least: int, timeout: float = 240) -> str:
    def reached(line: str) -> bool:
        match = ITERATION.search(line)
        return bool(match) and int(match.group(1)) >= at_least
    return read_until(proc, reached, timeout)
