"""Precomputed teacher final hidden states for the KD baseline: a megatron-core indexed dataset (.bin/.idx) plus a
JSON fingerprint (.json), written by tools/extract_concepts.py --teacher-states-prefix beside the concept labels.

Sequence i of PREFIX.bin holds the teacher's final hidden states of training sample i (after its final norm: what
its LM head reads) as seq_length x d_model float32 values, row-major ([seq_length, d_model] when reshaped).
Training with `--kd --kd-teacher-states PREFIX` computes the teacher's next-token log-probabilities as
log_softmax(head(states)): the numbers a teacher forward gives, at the cost of the head alone, because the
extraction's forward (which the labels need anyway) made them. On 2 CPU cores this took SmolLM2-135M's KD step
(8 x 128 tokens) from 4.8 s to 2.1 s, together with the chunked KL of model/losses.py. The price is disk: 4 x d_model
bytes per training token (SmolLM2-135M: 2.3 KB; 82K tokens: 189 MB), so it suits short runs and several students of
one teacher, not billions of tokens.

PREFIX.json records what produced the states, as the labels' fingerprint does without the SAE's keys (data
configuration, seed, tokenizer, number of samples, teacher path and dtype) plus the layout; training compares it
with its own configuration and refuses states made for other data or another teacher.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy
import torch

from megatron_cocomix.data.concept_labels import (
    SampleBlocksWriter,
    check_fingerprint,
    read_fingerprint,
    write_json_atomically,
)

FORMAT = "teacher_final_states"
FORMAT_VERSION = 1
# Keys of the labels' fingerprint (concept_labels.expected_fingerprint) that the final states do not depend on.
LABEL_ONLY_KEYS = ("teacher_layer", "sae_sha256", "num_labels", "attribution", "mask_invalid")


def states_fingerprint(labels_fingerprint: Mapping[str, Any]) -> dict:
    """The keys of a labels fingerprint that fix the teacher's final states of the same samples."""
    return {key: value for key, value in labels_fingerprint.items() if key not in LABEL_ONLY_KEYS}


class TeacherStatesWriter(SampleBlocksWriter):
    """Appends one [seq_length, d_model] float32 block per sample to PREFIX.bin; PREFIX.idx is written on close.
    The fingerprint is written separately (`write_states_fingerprint`), last, so a file without it is incomplete."""

    def __init__(self, prefix: str, seq_length: int, d_model: int) -> None:
        super().__init__(prefix, numpy.float32)
        self.seq_length, self.d_model = seq_length, d_model

    def add(self, states: torch.Tensor) -> None:
        """states: [n, seq_length, d_model] (n samples in order)."""
        if tuple(states.shape[1:]) != (self.seq_length, self.d_model):
            raise ValueError(f"teacher states of shape {tuple(states.shape[1:])} do not match [seq_length "
                             f"{self.seq_length}, d_model {self.d_model}] of {self.prefix}")
        for sample in states.detach().float().cpu():
            self._add_block(sample.reshape(-1))


def write_states_fingerprint(prefix: str, fingerprint: Mapping[str, Any], seq_length: int, d_model: int,
                             num_samples: int) -> dict:
    record = dict(states_fingerprint(fingerprint))
    record.update(format=FORMAT, format_version=FORMAT_VERSION, seq_length=seq_length, d_model=d_model,
                  num_samples=num_samples, dtype="float32")
    write_json_atomically(prefix + ".json", record)
    return record


class TeacherStatesDataset(torch.utils.data.Dataset):
    """Reader: `dataset[i]` is the float32 tensor [seq_length, d_model] of training sample i."""

    def __init__(self, prefix: str) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        for suffix in (".bin", ".idx"):
            if not os.path.exists(prefix + suffix):
                raise FileNotFoundError(f"teacher states {prefix}: no such file {prefix + suffix} (written by "
                                        f"tools/extract_concepts.py --teacher-states-prefix)")
        self.fingerprint = read_fingerprint(prefix, what="teacher states")
        if self.fingerprint.get("format") != FORMAT:
            raise ValueError(f"teacher states {prefix}: {prefix}.json is not a teacher-states fingerprint "
                             f"(format {self.fingerprint.get('format')!r}, expected {FORMAT!r})")
        self.prefix = prefix
        self.seq_length = int(self.fingerprint["seq_length"])
        self.d_model = int(self.fingerprint["d_model"])
        self._data = IndexedDataset(prefix)
        if len(self._data) != int(self.fingerprint["num_samples"]):
            raise ValueError(f"teacher states {prefix}: {len(self._data)} sequences but the fingerprint says "
                             f"{self.fingerprint['num_samples']} samples")
        if self._data.index.dtype != numpy.float32:
            raise ValueError(f"teacher states {prefix}: stored as {numpy.dtype(self._data.index.dtype).name}, "
                             "expected float32")

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"teacher states {self.prefix}: sample {index} out of range [0, {len(self)})")
        values = self._data[index]
        if values.size != self.seq_length * self.d_model:
            raise ValueError(f"teacher states {self.prefix}: sample {index} has {values.size} values, expected "
                             f"{self.seq_length} x {self.d_model}")
        return torch.from_numpy(numpy.array(values, dtype=numpy.float32)).view(self.seq_length, self.d_model)

    def check_fingerprint(self, labels_fingerprint: Mapping[str, Any], ignore: set = frozenset()) -> None:
        """Refuse states made for another configuration (the first differing key, with both values)."""
        check_fingerprint(self.fingerprint, states_fingerprint(labels_fingerprint), self.prefix, ignore,
                          what="teacher states")


class TeacherStatesAttached(torch.utils.data.Dataset):
    """Sample i of `dataset` plus 'teacher_states' [s, d] from precomputed states sequence i."""

    def __init__(self, dataset, states: TeacherStatesDataset, samples_needed: int, seq_length: int) -> None:
        if len(states) < samples_needed:
            raise ValueError(f"teacher states {states.prefix}: {len(states)} samples but training needs "
                             f"{samples_needed}; re-run tools/extract_concepts.py with the training flags")
        if states.seq_length != seq_length:
            raise ValueError(f"teacher states {states.prefix}: seq length {states.seq_length} != --seq-length "
                             f"{seq_length}")
        self.dataset, self.states = dataset, states

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        sample["teacher_states"] = self.states[index]
        return sample
