"""Data pipeline: tokenizers (tokenizer.py), megatron-core indexed datasets and the loader (datasets.py,
samplers.py). Submodules import megatron-core lazily so that `--help` and the tools start fast."""
