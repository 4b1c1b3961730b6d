"""Concept labels (and teacher distributions for KD) inside the training step.

Online: the frozen teacher + SAE run on the stage that holds the concept layer (labels) or on the last stage
(KD), for the same micro-batch the student sees. A micro-batch [b, s] is split over the tensor-parallel ranks
(each labels b / tp sequences, then an all-gather over TP) so TP ranks do not compute identical labels; when b is
not divisible by tp, TP rank 0 labels the whole micro-batch and broadcasts. Labels of a sequence do not depend on
its batch mates (attribution uses per-sequence losses), so the split gives the same labels as one pass.

Outside the training step (tools/extract_concepts.py, held-out evaluation, inspection), `AttributionLabeler` loads
the same teacher and SAE once, with training's checks, and labels whole batches in one process.

Precomputed: `ConceptLabeledDataset` adds the labels of training sample i (from tools/extract_concepts.py's
indexed dataset) to sample i of the token dataset; the fingerprint must match the training configuration.
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

import torch
from megatron.core import parallel_state

from megatron_cocomix import compat
from megatron_cocomix.concepts.attribution import attribution_labels, check_teacher_sae
from megatron_cocomix.concepts.sae import load_sae
from megatron_cocomix.concepts.teacher import check_teacher_tokenizer, load_teacher, tokenizer_vocab_size


def _split_over_tp(fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """fn over the batch dim of tokens [b, s], shared among TP ranks; returns fn(tokens) on every TP rank."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return fn(tokens)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    b = tokens.shape[0]
    if b % tp == 0:
        part = fn(tokens[rank * (b // tp):(rank + 1) * (b // tp)]).contiguous()
        parts = [torch.empty_like(part) for _ in range(tp)]
        torch.distributed.all_gather(parts, part, group=group)
        return torch.cat(parts, dim=0)
    src = torch.distributed.get_global_rank(group, 0)
    out = fn(tokens).contiguous() if rank == 0 else None
    dtypes = (torch.long, torch.float32)
    header = torch.zeros(4, dtype=torch.long, device=tokens.device)
    if rank == 0:
        header[: out.dim()] = torch.tensor(out.shape)
        header[3] = dtypes.index(out.dtype)
    torch.distributed.broadcast(header, src, group=group)
    if rank != 0:
        out = torch.empty(header[:3].tolist(), dtype=dtypes[int(header[3])], device=tokens.device)
    torch.distributed.broadcast(out, src, group=group)
    return out


def check_teacher_reads_student_ids(args: argparse.Namespace, student_tokenizer, teacher_vocab_size: int) -> None:
    """The teacher must read the student's token ids: a vocabulary at least as large, and the same encodings
    (a synthetic-id tokenizer, NullTokenizer, has no text to compare, only its size). `student_tokenizer`: a
    megatron-style tokenizer (training) or a Hugging Face one (a model's export)."""
    student_size = tokenizer_vocab_size(student_tokenizer)
    if student_size > teacher_vocab_size:
        raise ValueError(f"the data tokenizer has {student_size} ids but teacher {args.teacher_model} "
                         f"only {teacher_vocab_size}: the teacher must share the student's tokenizer")
    if args.tokenizer_type != "NullTokenizer":
        check_teacher_tokenizer(args.teacher_model, student_tokenizer)


class AttributionLabeler:
    """The frozen teacher and SAE of training's --teacher-model / --teacher-layer / --sae, loaded once and checked
    as training checks them; called on tokens [b, s] (the student's ids), returns labels [b, s, num_labels]
    (int64, -1 = none) on the teacher's device, with training's --concept-attribution and --concept-label-masking.
    The SAE runs in the teacher's precision (--teacher-dtype)."""

    def __init__(self, teacher_model: str, teacher_layer: int, sae_path: str, num_labels: int = 4,
                 attribution: str = "act", masking: str = "ignore", teacher_dtype: Optional[str] = None,
                 device: Optional[torch.device] = None, teacher_lm_head: str = "chunked"):
        self.teacher_model, self.num_labels, self.attribution = teacher_model, num_labels, attribution
        self.teacher = load_teacher(teacher_model, teacher_layer, dtype=teacher_dtype, device=device,
                                    lm_head=teacher_lm_head)
        self.sae = load_sae(sae_path, device=self.teacher.device, dtype=self.teacher.dtype).freeze()
        check_teacher_sae(self.teacher, self.sae)
        self.mask_invalid = masking == "ignore"
        # Refused before any labelling (labels_from_scores would refuse the first batch): preact scores every latent.
        if num_labels > self.sae.k and self.mask_invalid and attribution != "preact":
            raise ValueError(f"--concept-num-labels {num_labels} exceeds the SAE's k {self.sae.k} active latents")

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if int(tokens.max()) >= self.teacher.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} is outside teacher {self.teacher_model}'s vocabulary "
                             f"of {self.teacher.vocab_size}: the teacher must share the students' tokenizer")
        return attribution_labels(self.teacher, self.sae, tokens.to(self.teacher.device), self.num_labels,
                                  self.attribution, mask_invalid=self.mask_invalid)


class OnlineTeacher:
    """Loaded lazily, only on ranks that need it; weights frozen and never seen by the optimizer. Lives on
    `device`, by default this rank's device at first use (known only once the process groups exist). The SAE
    runs in the teacher's precision (--teacher-dtype: its storage dtype, and TF32 matmuls with tf32)."""

    def __init__(self, args: argparse.Namespace, device: Optional[torch.device] = None):
        self.args = args
        self._device = device
        self._teacher = None
        self._sae = None

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = compat.device()
        return self._device

    @property
    def teacher(self):
        if self._teacher is None:
            # The ids were checked once, at start-up (check_teacher_reads_student_ids): a per-step range check
            # would read them back from the device.
            self._teacher = load_teacher(self.args.teacher_model, self.args.teacher_layer,
                                         dtype=self.args.teacher_dtype, device=self.device, check_ids=False,
                                         lm_head=self.args.teacher_lm_head)
        return self._teacher

    @property
    def sae(self):
        if self._sae is None:
            self._sae = load_sae(self.args.sae, device=self.device, dtype=self.teacher.dtype).freeze()
            check_teacher_sae(self.teacher, self._sae)
        return self._sae

    def concept_labels(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> labels [b, s, K] (int64, -1 = none)."""
        def label(part: torch.Tensor) -> torch.Tensor:
            return attribution_labels(self.teacher, self.sae, part, num_labels=self.args.concept_num_labels,
                                      mode=self.args.concept_attribution,
                                      mask_invalid=self.args.concept_label_masking == "ignore").to(tokens.device)
        return _split_over_tp(label, tokens)

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> teacher next-token log-probabilities [b, s, V] (fp32)."""
        def teacher_log_probs(part: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(self.teacher.logits(part).float(), dim=-1).to(tokens.device)
        return _split_over_tp(teacher_log_probs, tokens)

    def log_probs_from_final_states(self, states: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states [b, s, d] (data/teacher_states.py) -> next-token log-probabilities
        [b, s, V] (fp32) through its head alone. Every TP rank holds the states, so each applies the head itself."""
        return torch.log_softmax(self.teacher.logits_from_final_states(states).float(), dim=-1).to(states.device)


class ConceptLabeledDataset(torch.utils.data.Dataset):
    """Sample i of `dataset` plus 'concept_labels' [s, K] from precomputed labels sequence i.

    With `labels=None` every label is -1 (ignored by the concept loss): validation and test samples have no
    precomputed labels, and the concept layer still runs on them (only the concept loss is not reported)."""

    def __init__(self, dataset, labels, seq_length: int, num_labels: Optional[int] = None,
                 samples_needed: int = 0):
        if labels is not None:
            if len(labels) < samples_needed:
                raise ValueError(f"concept labels {labels.prefix}: {len(labels)} samples but training needs "
                                 f"{samples_needed}; re-run tools/extract_concepts.py with the training flags")
            if labels.seq_length != seq_length:
                raise ValueError(f"concept labels {labels.prefix}: seq length {labels.seq_length} != --seq-length "
                                 f"{seq_length}")
            num_labels = labels.num_labels
        self.dataset, self.labels = dataset, labels
        self._no_labels = torch.full((seq_length, num_labels), -1, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        sample["concept_labels"] = self.labels[index] if self.labels is not None else self._no_labels
        return sample
