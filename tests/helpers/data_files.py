"""Small input files for the tests: JSON lines corpora and megatron token datasets."""

from __future__ import annotations

import json

import torch


def write_jsonl(path, texts, key="text"):
    """One JSON object {key: text} per line; returns the path as a string."""
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return str(path)


def write_token_dataset(prefix: str, vocab_size: int, num_docs: int = 20, seed: int = 0, min_len: int = 20,
                        max_len: int = 120) -> list:
    """A megatron .bin/.idx of random token documents; returns the documents."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    g = torch.Generator().manual_seed(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    docs = []
    for _ in range(num_docs):
        n = int(torch.randint(min_len, max_len, (1,), generator=g))
        doc = torch.randint(0, vocab_size, (n,), generator=g, dtype=torch.int32)
        builder.add_item(doc)
        builder.end_document()
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    return docs
