"""The repository root, the shipped example data the tests read, and the examples' Python scripts as modules."""

import functools
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "examples", "data", "shakespeare.jsonl.gz")
GPT2_VOCAB = os.path.join(ROOT, "examples", "data", "gpt2", "encoder.json")
GPT2_MERGES = os.path.join(ROOT, "examples", "data", "gpt2", "vocab.bpe")
GPT2_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", GPT2_VOCAB, "--merge-file", GPT2_MERGES]


@functools.lru_cache(maxsize=None)
def load_example(name: str):
    """examples/<name>.py (a script, not a package) as a module, imported from its file without touching
    sys.path; loaded once per process."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
