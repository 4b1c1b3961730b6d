"""Describe a preprocessed megatron-core dataset: counts, dtype, a decoded document, the most frequent tokens.

    python tools/inspect_data.py --data-path data/shakespeare_text_document --tokenizer-type GPT2BPETokenizer \
        --vocab-file examples/data/gpt2/encoder.json --merge-file examples/data/gpt2/vocab.bpe

The .bin/.idx pair is checked first (same checks as training: sizes agree, ids inside the vocabulary). Without
tokenizer flags the counts and the histogram are printed with raw ids only.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.data.tokenizer import add_tokenizer_args, build_tokenizer_from_flags  # noqa: E402
from megatron_cocomix.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Inspect a .bin/.idx dataset.", allow_abbrev=False)
    parser.add_argument("--data-path", required=True, help="Dataset prefix (without .bin/.idx).")
    add_tokenizer_args(parser)
    parser.add_argument("--document", type=int, default=0, help="Index of the document to decode.")
    parser.add_argument("--max-chars", type=int, default=500, help="Characters of the decoded document to print.")
    parser.add_argument("--top", type=int, default=10, help="Rows of the token histogram.")
    return parser


def inspect(args: argparse.Namespace) -> str:
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_cocomix.data.datasets import validate_indexed_dataset

    tokenizer = None
    if args.tokenizer_type is not None:
        tokenizer = build_tokenizer_from_flags(args.tokenizer_type, args.vocab_file, args.merge_file,
                                               args.tokenizer_model, args.vocab_size)
    summary = validate_indexed_dataset(args.data_path, vocab_size=tokenizer.vocab_size if tokenizer else None)
    if not 0 <= args.document < summary.num_documents:
        raise ValueError(f"--document {args.document}: the dataset has {summary.num_documents} documents")
    dataset = IndexedDataset(args.data_path)
    lengths = summary.sequence_lengths
    lines = [
        f"dataset     {args.data_path}.bin/.idx ({os.path.getsize(args.data_path + '.bin') / 1e6:.2f} MB)",
        f"dtype       {numpy.dtype(summary.dtype).name}",
        f"documents   {summary.num_documents}",
        f"sequences   {summary.num_sequences}",
        f"tokens      {summary.num_tokens}",
        f"doc length  min {lengths.min()}  mean {lengths.mean():.1f}  max {lengths.max()} tokens",
    ]
    first, last = dataset.document_indices[args.document], dataset.document_indices[args.document + 1]
    ids = numpy.concatenate([dataset[i] for i in range(first, last)]).astype(numpy.int64)
    lines.append(f"document {args.document}: {ids.size} tokens, ids {ids[:16].tolist()}{' ...' if ids.size > 16 else ''}")
    if tokenizer is not None:
        ends_with_eod = ids.size > 0 and ids[-1] == tokenizer.eod
        text = tokenizer.detokenize(ids[:-1] if ends_with_eod else ids)
        shown = text[:args.max_chars] + (" [...]" if len(text) > args.max_chars else "")
        lines.append(f"ends with eod ({tokenizer.eod}): {ends_with_eod}")
        lines.append("---- decoded ----")
        lines.append(shown)
        lines.append("-----------------")
    data = numpy.memmap(args.data_path + ".bin", mode="r", dtype=summary.dtype)
    counts = numpy.bincount(numpy.asarray(data, dtype=numpy.int64))
    top = numpy.argsort(-counts, kind="stable")[:args.top]
    lines.append(f"token histogram (top {len(top)} of {int((counts > 0).sum())} distinct ids):")
    for token in top:
        piece = repr(tokenizer.detokenize([int(token)])) if tokenizer is not None else ""
        lines.append(f"  {int(token):>7d}  {int(counts[token]):>10d}  {100 * counts[token] / summary.num_tokens:5.2f}%  {piece}")
    return "\n".join(lines)


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    print(inspect(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
