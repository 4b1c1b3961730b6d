"""Training data: megatron-core GPTDatasets over .bin/.idx files, blended and split, and the pretraining loader.

Data flow (Megatron's, built by megatron-core's BlendedMegatronDatasetBuilder):
    --data-path W1 P1 W2 P2   -> IndexedDataset per prefix (mmap of P.bin, index P.idx)
    --split 969,30,1          -> each prefix's documents cut into contiguous train/valid/test ranges
    GPTDataset                -> documents shuffled (seeded), packed back to back with EOD between them, cut
                                 into samples of seq_length + 1 tokens:
                                 tokens = x[:-1], labels = x[1:]  (each [seq_length], int64)
                                 loss_mask [seq_length] float (0 on EOD with --eod-mask-loss)
                                 position_ids [seq_length] (restart after EOD with --reset-position-ids)
                                 attention_mask [1, seq_length, seq_length] bool, True = masked (only with
                                 --reset-attention-mask; otherwise the model uses its causal mask)
    BlendedDataset            -> sample i comes from dataset k so that after n samples each dataset has given
                                 ~ w_k x n of them
The loader (samplers.PretrainingSampler) walks the global sample order from `consumed_samples`: each global
micro-batch of micro_batch_size x DP consecutive samples is split among the DP ranks, so a resumed run continues
at the next sample, and the order does not depend on the number of loader workers.

Every prefix is checked by `validate_indexed_dataset` before megatron-core touches it: a missing, truncated or
mismatched .bin/.idx pair, or one with 0 tokens (megatron-core's GPTDataset would loop forever computing its
epochs), is refused with one line naming the file.
"""

from __future__ import annotations

import argparse
import os
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy

from megatron_cocomix.data.samplers import PretrainingSampler

_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
_DTYPE_CODES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64, 8: numpy.uint16}
_TOKEN_PROBE_SEQUENCES = 64  # sequences read at each end to check ids against the tokenizer's vocabulary


@dataclass
class IndexedDatasetSummary:
    """What the .idx says, after it was checked against the .bin."""

    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    num_tokens: int
    sequence_lengths: numpy.ndarray  # [num_sequences] int32, a view of the .idx


def validate_indexed_dataset(prefix: str, vocab_size: Optional[int] = None) -> IndexedDatasetSummary:
    """Check a megatron-core .bin/.idx pair without trusting it; raise one line naming the bad file.

    Refuses: a missing file, a short or malformed .idx, a .bin whose size is not the number of tokens the .idx
    describes times the dtype size (truncated, or written with another dtype or for another index), a dataset
    with 0 tokens, and (given vocab_size) ids that cannot come from this tokenizer.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data prefix {prefix}: {path} does not exist")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(_INDEX_HEADER_BYTES)
    if len(header) < _INDEX_HEADER_BYTES or header[:9] != _INDEX_MAGIC:
        raise ValueError(f"{idx_path}: not a megatron IndexedDataset index (bad or short header)")
    version, code, num_sequences, num_documents = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise ValueError(f"{idx_path}: unsupported index version {version}")
    if code not in _DTYPE_CODES:
        raise ValueError(f"{idx_path}: token dtype code {code} is not an integer type")
    dtype = _DTYPE_CODES[code]
    body = num_sequences * (4 + 8) + num_documents * 8
    if idx_size not in (_INDEX_HEADER_BYTES + body, _INDEX_HEADER_BYTES + body + num_sequences):
        raise ValueError(f"{idx_path}: {idx_size} bytes, but its header announces {num_sequences} sequences and "
                         f"{num_documents} document bounds ({_INDEX_HEADER_BYTES + body} bytes): truncated or corrupt")
    index = numpy.memmap(idx_path, mode="r", dtype=numpy.uint8)
    lengths = numpy.frombuffer(index, dtype=numpy.int32, count=num_sequences, offset=_INDEX_HEADER_BYTES)
    pointers = numpy.frombuffer(index, dtype=numpy.int64, count=num_sequences,
                                offset=_INDEX_HEADER_BYTES + 4 * num_sequences)
    documents = numpy.frombuffer(index, dtype=numpy.int64, count=num_documents,
                                 offset=_INDEX_HEADER_BYTES + 12 * num_sequences)
    if num_documents < 1 or documents[0] != 0 or documents[-1] != num_sequences or \
            numpy.any(numpy.diff(documents) < 0) or numpy.any(lengths < 0):
        raise ValueError(f"{idx_path}: inconsistent document bounds or negative lengths: corrupt index")
    itemsize = numpy.dtype(dtype).itemsize
    num_tokens = int(lengths.sum(dtype=numpy.int64))
    expected_bin = num_tokens * itemsize
    if num_sequences and pointers[-1] != (num_tokens - int(lengths[-1])) * itemsize:
        raise ValueError(f"{idx_path}: sequence offsets do not match the lengths for dtype "
                         f"{numpy.dtype(dtype).name}: corrupt index")
    bin_size = os.path.getsize(bin_path)
    if bin_size != expected_bin:
        what = "truncated" if bin_size < expected_bin else "longer than its index"
        raise ValueError(f"{bin_path}: {bin_size} bytes, but {idx_path} describes {num_tokens} "
                         f"{numpy.dtype(dtype).name} tokens ({expected_bin} bytes): {what}, or written with "
                         f"another dtype / for another index")
    if num_tokens == 0:
        raise ValueError(f"data prefix {prefix}: the dataset has 0 tokens (megatron-core's GPTDataset cannot "
                         f"sample from it); preprocess a non-empty corpus")
    if vocab_size is not None:
        if numpy.iinfo(dtype).max + 1 < vocab_size:
            raise ValueError(f"{idx_path}: tokens stored as {numpy.dtype(dtype).name} cannot hold the tokenizer's "
                             f"{vocab_size} ids: preprocessed with another tokenizer")
        data = numpy.memmap(bin_path, mode="r", dtype=dtype)
        for chunk in (slice(0, int(lengths[:_TOKEN_PROBE_SEQUENCES].sum())),
                      slice(len(data) - int(lengths[-_TOKEN_PROBE_SEQUENCES:].sum()), len(data))):
            ids = numpy.asarray(data[chunk])
            if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
                bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
                raise ValueError(f"{bin_path}: token id {bad} is outside the tokenizer's vocabulary [0, {vocab_size}):"
                                 f" preprocessed with another tokenizer")
    return IndexedDatasetSummary(prefix, dtype, num_sequences, num_documents - 1, num_tokens, lengths)


def parse_blend(values: Optional[Sequence[str]], flag: str) -> Optional[Tuple[List[str], Optional[List[float]]]]:
    """`P1 P2 ...` or `W1 P1 W2 P2 ...` -> (prefixes, weights or None), megatron-core's blend format."""
    if not values:
        return None
    values = list(values)

    def as_weight(text: str) -> Optional[float]:
        try:
            return float(text)
        except ValueError:
            return None

    if len(values) % 2 == 0 and as_weight(values[0]) is not None:
        weights = [as_weight(v) for v in values[0::2]]
        prefixes = values[1::2]
        for w, raw in zip(weights, values[0::2]):
            if w is None or not w > 0:
                raise ValueError(f"{flag}: weight {raw!r} must be a positive number (format: W1 PREFIX1 W2 PREFIX2 ...)")
        for p in prefixes:
            if as_weight(p) is not None:
                raise ValueError(f"{flag}: {p!r} is in a prefix position (format: W1 PREFIX1 W2 PREFIX2 ...)")
        return prefixes, weights
    for v in values:
        if as_weight(v) is not None:
            raise ValueError(f"{flag}: {v!r} looks like a weight, but the list is not W1 PREFIX1 W2 PREFIX2 ...")
    return values, None


def _split_matrix(split: str) -> List[Optional[Tuple[float, float]]]:
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def _check_split_not_empty(summary: IndexedDatasetSummary, split: str) -> None:
    """megatron-core cuts a prefix's sequences at round(bound x n); a non-empty split range must hold tokens."""
    n = summary.num_sequences
    for name, bounds in zip(("train", "valid", "test"), _split_matrix(split)):
        if bounds is None:
            continue
        begin, end = int(round(bounds[0] * float(n))), int(round(bounds[1] * float(n)))
        if int(summary.sequence_lengths[begin:end].sum(dtype=numpy.int64)) == 0:
            raise ValueError(f"--split {split}: the {name} part of {summary.prefix} ({summary.num_documents} "
                             f"documents) gets 0 tokens; give more documents or set its share to 0 (e.g. 98,2,0)")


def _gpt_config(args: argparse.Namespace, tokenizer, blend, blend_per_split, split):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=bool(args.reset_position_ids),
        reset_attention_mask=bool(args.reset_attention_mask),
        eod_mask_loss=bool(args.eod_mask_loss),
        # The model builds its own causal mask; a per-sample [1, s, s] mask is only needed to block attention
        # across documents.
        create_attention_mask=bool(args.reset_attention_mask),
    )


def build_train_valid_test_datasets(args: argparse.Namespace, tokenizer,
                                    train_valid_test_num_samples: Sequence[Optional[int]]):
    """(train, valid, test) megatron-core datasets (None for a split that has no data). Call on every rank."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    sizes = list(train_valid_test_num_samples)
    if len(sizes) != 3:
        raise ValueError(f"train_valid_test_num_samples must have 3 entries, got {sizes}")
    if getattr(args, "mock_data", False):
        config = _gpt_config(args, tokenizer, None, None, None)
        dataset_cls = MockGPTDataset
    else:
        blend = parse_blend(args.data_path, "--data-path")
        per_split = [parse_blend(getattr(args, f"{s}_data_path", None), f"--{s}-data-path")
                     for s in ("train", "valid", "test")]
        if blend is None and not any(per_split):
            raise ValueError("no training data: give --data-path, --train-data-path or --mock-data")
        split = (args.split or "969,30,1") if blend is not None else None
        for flag, b in [("--data-path", blend)] + list(zip(("--train-data-path", "--valid-data-path",
                                                            "--test-data-path"), per_split)):
            if b is None:
                continue
            for prefix in b[0]:
                summary = validate_indexed_dataset(prefix, vocab_size=tokenizer.vocab_size)
                if split is not None:
                    _check_split_not_empty(summary, split)
        config = _gpt_config(args, tokenizer, blend, None if blend is not None else per_split, split)
        dataset_cls = GPTDataset
        if args.data_cache_path is not None:
            os.makedirs(args.data_cache_path, exist_ok=True)
    # Every rank that feeds the model reads the data itself; rank 0 builds the index caches first.
    builder = BlendedMegatronDatasetBuilder(dataset_cls, sizes, lambda: True, config)
    train, valid, test = builder.build()
    return train, valid, test


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                                  data_parallel_size: int, num_workers: int, worker_init_fn=None):
    """A DataLoader yielding this rank's micro-batches (dicts of [micro_batch_size, ...] tensors), from
    `consumed_samples` on; None when `dataset` is None (a split without data). `worker_init_fn(worker_id)` runs
    first in each worker process (the trainer's makes workers ignore its exit signal)."""
    import torch

    if dataset is None:
        return None
    if num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {num_workers}")
    sampler = PretrainingSampler(total_samples=len(dataset), consumed_samples=consumed_samples,
                                 micro_batch_size=micro_batch_size, data_parallel_rank=data_parallel_rank,
                                 data_parallel_size=data_parallel_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                                       worker_init_fn=worker_init_fn if num_workers > 0 else None)
