"""The repository root and the shipped example data the tests read."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "examples", "data", "shakespeare.jsonl.gz")
GPT2_VOCAB = os.path.join(ROOT, "examples", "data", "gpt2", "encoder.json")
GPT2_MERGES = os.path.join(ROOT, "examples", "data", "gpt2", "vocab.bpe")
GPT2_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", GPT2_VOCAB, "--merge-file", GPT2_MERGES]
