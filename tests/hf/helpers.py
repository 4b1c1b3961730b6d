"""Export helpers shared by the Hugging Face tests: tools/convert_to_hf.py run in this process (a world of one,
the `single_process` fixture), its verify numbers parsed from its output."""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Dict, List, Tuple

VERIFY_RE = re.compile(r"verify: max abs logit diff (\S+), mean KL (\S+)")


def convert(args: List[str]) -> Tuple[int, str, str]:
    """tools/convert_to_hf.main(args) -> (exit status, stdout, stderr)."""
    from tools import convert_to_hf

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = convert_to_hf.main(args)
    return code, out.getvalue(), err.getvalue()


_EXPORTS: Dict[Tuple[str, str], Tuple[str, Dict[str, float]]] = {}


def export(checkpoint: str, root: str, key: Tuple[str, str]) -> Tuple[str, Dict[str, float]]:
    """Export `checkpoint` once per session into root/<layout>_<variant>; returns (dir, verify numbers)."""
    if key not in _EXPORTS:
        output = os.path.join(root, "_".join(key))
        code, out, err = convert(["--load", checkpoint, "--output", output])
        assert code == 0, f"convert_to_hf exited {code}:\n{out}\n{err}"
        match = VERIFY_RE.search(out)
        assert match, out
        _EXPORTS[key] = output, {"max_abs_logit_diff": float(match.group(1)), "mean_kl": float(match.group(2))}
    return _EXPORTS[key]
