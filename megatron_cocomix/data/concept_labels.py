"""Precomputed concept labels: a megatron-core indexed dataset (.bin/.idx) plus a JSON fingerprint (.json).

Sequence i of PREFIX.bin holds the labels of training sample i (the i-th item of the training dataset the data
flags build) as seq_length x num_labels latent ids, row-major ([seq_length, num_labels] when reshaped).
dtype: uint16 when the SAE has C <= 65535 latents, with "no label" (-1) stored as 65535 (never a latent id
then); int32 otherwise, storing -1 as is.

PREFIX.json (the fingerprint) records what produced the labels: data configuration (data paths, split, seq
length, seed, tokenizer, number of samples), teacher path and layer, SAE identity (sha256 of its files),
num_labels and attribution mode, plus the storage layout. Training compares it with its own configuration
(`check_fingerprint`) and refuses labels made for other data or another teacher.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy
import torch

NO_LABEL_UINT16 = 65535
FORMAT_VERSION = 1


def fingerprint_path(prefix: str) -> str:
    return prefix + ".json"


def labels_dtype(num_latents: int) -> type:
    return numpy.uint16 if num_latents <= NO_LABEL_UINT16 else numpy.int32


def encode_labels(labels: torch.Tensor, dtype: type) -> torch.Tensor:
    """int64 labels (-1 = none) -> storage values of `dtype`, as a flat tensor."""
    labels = labels.reshape(-1).to(torch.int64)
    if dtype == numpy.uint16:
        if labels.numel() and int(labels.max()) >= NO_LABEL_UINT16:
            raise ValueError(f"label {int(labels.max())} does not fit uint16 storage (ids must be < {NO_LABEL_UINT16})")
        labels = torch.where(labels < 0, torch.full_like(labels, NO_LABEL_UINT16), labels)
        return torch.from_numpy(labels.numpy().astype(numpy.uint16))
    return labels.to(torch.int32)


def decode_labels(values: numpy.ndarray, seq_length: int, num_labels: int) -> torch.Tensor:
    """Storage values -> int64 LongTensor [seq_length, num_labels] with -1 restored."""
    labels = torch.from_numpy(values.astype(numpy.int64))
    if values.dtype == numpy.uint16:
        labels[labels == NO_LABEL_UINT16] = -1
    return labels.view(seq_length, num_labels)


class SampleBlocksWriter:
    """One block of values per sample, appended to PREFIX.bin by megatron-core's IndexedDatasetBuilder (one
    "document" per sample); `add_shard` appends a finished file of the same dtype (shards are merged in order);
    `finalize` writes PREFIX.idx. Subclasses check and encode the blocks."""

    def __init__(self, prefix: str, dtype: type) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix, self.dtype = prefix, dtype
        self._builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        self.num_samples = 0

    def _add_block(self, values: torch.Tensor) -> None:
        self._builder.add_item(values)
        self._builder.end_document()
        self.num_samples += 1

    def add_shard(self, shard_prefix: str) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self._builder.add_index(shard_prefix)
        self.num_samples += len(IndexedDataset(shard_prefix))

    def finalize(self) -> None:
        self._builder.finalize(self.prefix + ".idx")


def write_json_atomically(path: str, record: Mapping[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class ConceptLabelsWriter(SampleBlocksWriter):
    """Appends one [seq_length, num_labels] label block per sample to PREFIX.bin and writes PREFIX.idx on close.

    The fingerprint is written separately (`write_fingerprint`) once all shards are merged, so a file without it
    is incomplete.
    """

    def __init__(self, prefix: str, seq_length: int, num_labels: int, num_latents: int) -> None:
        super().__init__(prefix, labels_dtype(num_latents))
        self.seq_length, self.num_labels = seq_length, num_labels

    def add(self, labels: torch.Tensor) -> None:
        """labels: [seq_length, num_labels] or [n, seq_length, num_labels] (n samples in order)."""
        if labels.dim() == 2:
            labels = labels.unsqueeze(0)
        if tuple(labels.shape[1:]) != (self.seq_length, self.num_labels):
            raise ValueError(f"labels of shape {tuple(labels.shape[1:])} do not match [seq_length {self.seq_length}, "
                             f"num_labels {self.num_labels}] of {self.prefix}")
        for sample in labels.cpu():
            self._add_block(encode_labels(sample, self.dtype))


def write_fingerprint(prefix: str, fingerprint: Mapping[str, Any], seq_length: int, num_labels: int,
                      num_latents: int, num_samples: int) -> dict:
    """Write PREFIX.json: the caller's fingerprint plus the storage layout; returns what was written."""
    record = dict(fingerprint)
    record.update(format_version=FORMAT_VERSION, seq_length=seq_length, num_labels=num_labels,
                  num_latents=num_latents, num_samples=num_samples,
                  dtype=numpy.dtype(labels_dtype(num_latents)).name)
    write_json_atomically(fingerprint_path(prefix), record)
    return record


def read_fingerprint(prefix: str, what: str = "concept labels") -> dict:
    """PREFIX.json of a file tools/extract_concepts.py wrote; `what` names the file kind in errors."""
    path = fingerprint_path(prefix)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {prefix}: no fingerprint {path} (incomplete, or not written by "
                                "tools/extract_concepts.py)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {prefix}: invalid fingerprint {path} ({e})") from None


class ConceptLabelsDataset(torch.utils.data.Dataset):
    """Reader: `dataset[i]` is the LongTensor [seq_length, num_labels] of training sample i (-1 = no label)."""

    def __init__(self, prefix: str) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        for suffix in (".bin", ".idx"):
            if not os.path.exists(prefix + suffix):
                raise FileNotFoundError(f"concept labels {prefix}: no such file {prefix + suffix}")
        self.prefix = prefix
        self.fingerprint = read_fingerprint(prefix)
        self.seq_length = int(self.fingerprint["seq_length"])
        self.num_labels = int(self.fingerprint["num_labels"])
        self.num_latents = int(self.fingerprint["num_latents"])
        self._data = IndexedDataset(prefix)
        if len(self._data) != int(self.fingerprint["num_samples"]):
            raise ValueError(f"concept labels {prefix}: {len(self._data)} sequences but the fingerprint says "
                             f"{self.fingerprint['num_samples']} samples")
        expected = numpy.dtype(self.fingerprint["dtype"])
        if self._data.index.dtype != expected:
            raise ValueError(f"concept labels {prefix}: stored as {numpy.dtype(self._data.index.dtype).name} but the "
                             f"fingerprint says {expected.name}")

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"concept labels {self.prefix}: sample {index} out of range [0, {len(self)})")
        values = self._data[index]
        if values.size != self.seq_length * self.num_labels:
            raise ValueError(f"concept labels {self.prefix}: sample {index} has {values.size} entries, expected "
                             f"{self.seq_length} x {self.num_labels}")
        return decode_labels(values, self.seq_length, self.num_labels)

    def check_fingerprint(self, expected: Mapping[str, Any], ignore: Optional[set] = None) -> None:
        """Refuse labels made for another configuration: the first differing key is named with both values.

        Only the keys of `expected` are compared; a key missing from the file is a mismatch too.
        """
        check_fingerprint(self.fingerprint, expected, self.prefix, ignore)


def check_fingerprint(actual: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "",
                      ignore: Optional[set] = None, what: str = "concept labels") -> None:
    """The first key of `expected` that `actual` lacks or holds another value of: one error naming the file
    (`what` PREFIX), the key and both values."""
    for key in sorted(expected):
        if ignore and key in ignore:
            continue
        want = _canonical(expected[key])
        if key not in actual:
            raise ValueError(f"{what} {prefix}: fingerprint has no {key!r} (expected {want!r}); "
                             "re-run tools/extract_concepts.py")
        got = _canonical(actual[key])
        if got != want:
            raise ValueError(f"{what} {prefix}: fingerprint {key!r} is {got!r} but this run has {want!r}; "
                             "re-run tools/extract_concepts.py with the training flags")


def _canonical(value: Any) -> Any:
    # JSON turns tuples into lists; compare the JSON forms.
    return json.loads(json.dumps(value, sort_keys=True))


def expected_fingerprint(args, tokenizer, num_samples: int, sae_sha256: str) -> dict:
    """The fingerprint of labels for the training samples that `args` produce; tools/extract_concepts.py writes
    it and training compares against it, so both sides build it here. `args`: the parsed training flags."""
    def absolute(paths):
        # Keep blend weights as they are; make prefixes absolute so the working directory does not matter.
        if not paths:
            return paths
        return [p if _is_number(p) else os.path.abspath(p) for p in paths]

    return {
        "data_path": absolute(args.data_path),
        "train_data_path": absolute(args.train_data_path),
        "mock_data": bool(args.mock_data),
        "split": args.split,
        "seq_length": args.seq_length,
        "seed": args.seed,
        "tokenizer": _canonical(dict(tokenizer.unique_identifiers)),
        "num_samples": int(num_samples),
        "teacher_model": os.path.abspath(args.teacher_model),
        "teacher_layer": args.teacher_layer,
        "sae_sha256": sae_sha256,
        "num_labels": args.concept_num_labels,
        "attribution": args.concept_attribution,
        "mask_invalid": args.concept_label_masking == "ignore",
        "teacher_dtype": args.teacher_dtype,
    }


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
