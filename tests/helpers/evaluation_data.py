"""Token data for the evaluation tests: megatron .bin/.idx files of random documents that end with the EOD token."""

from __future__ import annotations

import numpy
import torch

EOD = 255  # NullTokenizer of TINY_GPT: ids 0..254, EOD 255
CONTEXT = 32  # TINY_GPT's --seq-length
PADDED_EOD = 200  # gpt2_padded: ids 0..199, EOD 200, table padded to 256 rows


def write_documents(prefix: str, num_docs: int = 24, seed: int = 0, min_len: int = 3, max_len: int = 90,
                    eod: int = EOD) -> list:
    """A megatron .bin/.idx of random documents (ids < eod) each ending with eod; returns them (int64)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    docs = []
    for _ in range(num_docs):
        doc = numpy.append(rng.integers(0, eod, int(rng.integers(min_len, max_len))), eod).astype(numpy.int64)
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    return docs


def run_evaluate(args) -> tuple:
    """tools/evaluate.main(args + --no-progress) in this process -> (exit status, stdout, stderr)."""
    import contextlib
    import io

    from tools import evaluate as tool

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tool.main([*args, "--no-progress"])
    return code, out.getvalue(), err.getvalue()
