"""Concept prediction on held-out data (docs/design.md §18): a student's concept loss and accuracy against its labels.

Windows. The held-out documents (evaluation/lm.py's `read_documents`: the same split and documents as the
perplexity) are concatenated in order, each ending with its EOD, and cut into consecutive windows of s tokens
(the last partial window is dropped), as training cuts its samples: tokens [n, s].

Labels y [n, s, K] are the teacher's attribution labels of each window (docs/design.md §3), computed by the same
function training and tools/extract_concepts.py use (`attribution_labels`), online from --teacher-model /
--teacher-layer / --sae, or read from a labels file that tools/extract_concepts.py --eval-split wrote for these
windows. Labels are computed once and scored against every model.

Metrics, for the student's concept logits z [n, s, C] at its concept layer (docs/design.md §6, §11), summed over
all windows before dividing, so they weigh every label (or token) equally:
    concept loss      = sum over valid (token, label) of (logsumexp(z) - z[y_k]) / number of valid labels
    concept top1 acc  = tokens whose argmax z equals their first label / tokens with a valid first label
    concept topk acc  = valid labels among the student's top-k ids (k = the model's --concept-topk) / valid labels
Chance levels, for a student that knows nothing: 1 / C for top-1 and k / C for top-k.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy
import torch

from megatron_cocomix.evaluation.lm import replica_share
from megatron_cocomix.model.losses import concept_accuracy

# tokens [b, s] -> concept logits [b, s, C]
ConceptLogits = Callable[[torch.Tensor], torch.Tensor]


def concept_windows(docs: Sequence[numpy.ndarray], seq_length: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Consecutive windows [n, seq_length] of the concatenated documents (module docstring)."""
    if seq_length <= 0:
        raise ValueError(f"--seq-length must be positive, got {seq_length}")
    stream = numpy.concatenate([numpy.asarray(d, dtype=numpy.int64) for d in docs])
    n = len(stream) // seq_length
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the held-out documents hold {len(stream)} tokens, fewer than one window of "
                         f"{seq_length}: score more documents or use a shorter --seq-length")
    return torch.from_numpy(stream[:n * seq_length].reshape(n, seq_length).copy())


def online_labeler(teacher_model: str, teacher_layer: int, sae_path: str, num_labels: int = 4,
                   attribution: str = "act", masking: str = "ignore",
                   teacher_dtype: str = "fp32") -> Callable[[torch.Tensor], torch.Tensor]:
    """Training's teacher and SAE, loaded once (concepts.labeling.AttributionLabeler): labels [b, s, K] on the CPU
    for windows [b, s]."""
    from megatron_cocomix.concepts.labeling import AttributionLabeler

    labeler = AttributionLabeler(teacher_model, teacher_layer, sae_path, num_labels, attribution, masking,
                                 teacher_dtype)
    return lambda tokens: labeler(tokens).cpu()


def check_eval_labels(prefix: str, documents):
    """The labels file of tools/extract_concepts.py --eval-split at `prefix`, refused (one line) when it was made
    for other documents than `documents` (data, split, eval split, first document)."""
    import os

    from megatron_cocomix.data.concept_labels import ConceptLabelsDataset

    labels = ConceptLabelsDataset(prefix)
    fingerprint = labels.fingerprint
    expected = {"eval_split": documents.eval_split, "split": documents.split,
                "data_path": [os.path.abspath(documents.prefix)]}
    for key, want in expected.items():
        if fingerprint.get(key) != want:
            raise ValueError(f"--concept-labels {prefix}: made for {key} {fingerprint.get(key)!r}, this evaluation "
                             f"has {want!r} (tools/extract_concepts.py --eval-split with the same data flags)")
    if (fingerprint.get("document_range") or [None])[0] != documents.begin:
        raise ValueError(f"--concept-labels {prefix}: made for documents {fingerprint.get('document_range')}, this "
                         f"evaluation starts at document {documents.begin}")
    return labels


def read_eval_labels(prefix: str, documents, windows: torch.Tensor) -> torch.Tensor:
    """labels [n, s, K] of the windows from a file of tools/extract_concepts.py --eval-split (check_eval_labels),
    refused when its windows are of another length or fewer."""
    labels = check_eval_labels(prefix, documents)
    if labels.seq_length != windows.shape[1] or len(labels) < len(windows):
        raise ValueError(f"--concept-labels {prefix}: holds {len(labels)} windows of {labels.seq_length} tokens, "
                         f"this evaluation needs {len(windows)} of {windows.shape[1]} (check --seq-length and "
                         f"--max-documents)")
    return torch.stack([labels[i] for i in range(len(windows))]).long()


def label_windows(labeler: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch_size: int = 8,
                  progress: bool = False) -> torch.Tensor:
    """labels [n, s, K] of every window, batch_size windows per teacher call (labels of a window do not depend
    on the others of its batch)."""
    from tqdm import tqdm

    parts = []
    for begin in tqdm(range(0, len(windows), batch_size), desc="teacher labels", unit="batch",
                      disable=not progress):
        parts.append(labeler(windows[begin:begin + batch_size]))
    return torch.cat(parts)


def score_concepts(concept_logits: ConceptLogits, topk: int, windows: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 8, name: str = "model", progress: bool = False,
                   data_parallel: Tuple[int, int] = (0, 1),
                   all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
    """{concept_loss, concept_top1_acc, concept_topk_acc, concept_label_count, concept_tokens, concept_topk} of a
    student's concept logits against labels [n, s, K] (module docstring).

    Under a launcher (evaluation/parallel.py) this rank scores every `size`-th batch (`data_parallel` = (rank,
    size); the same number of calls on every rank), `concept_logits` returns None on ranks that hold no concept
    logits, and `all_reduce` sums the counts over the world."""
    from tqdm import tqdm

    if labels.shape[:2] != windows.shape:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not cover the windows {tuple(windows.shape)}")
    # loss sum, valid labels, top-1 hits / total, top-k hits / total, concepts C (a max, kept as a sum of one)
    sums = torch.zeros(7, dtype=torch.float64)
    # A begin of len(windows) is an empty batch.
    mine = replica_share(list(range(0, len(windows), batch_size)), data_parallel, len(windows))
    for begin in tqdm(mine, desc=f"concepts {name}", unit="batch", disable=not progress):
        tokens, y = windows[begin:begin + batch_size], labels[begin:begin + batch_size]
        with torch.no_grad():
            z = concept_logits(tokens)
        if z is None or len(tokens) == 0:
            continue
        z = z.float().cpu()  # [b, s, C]
        num_latents = z.shape[-1]
        if int(y.max()) >= num_latents:
            raise ValueError(f"label {int(y.max())} is outside {name}'s {num_latents} concepts: the labels come "
                             f"from another SAE than the one the student was trained with")
        valid = y >= 0
        target = torch.gather(z, -1, y.clamp(min=0))
        sums[0] += float(((torch.logsumexp(z, dim=-1, keepdim=True) - target) * valid).double().sum())
        sums[1] += int(valid.sum())
        top_ids = z.topk(topk, dim=-1).indices
        accuracy = concept_accuracy(top_ids, y)
        sums[2:6] += torch.tensor([float(v) for v in (*accuracy["concept top1 acc"], *accuracy["concept topk acc"])],
                                  dtype=torch.float64)
        sums[6] = num_latents
    if all_reduce is not None:
        # one replica's scoring rank holds C, the others 0: the sum is C times the replicas that scored anything
        scored = all_reduce(torch.tensor([float(sums[6] > 0)], dtype=torch.float64))
        sums = all_reduce(sums)
        sums[6] = sums[6] / scored[0] if scored[0] > 0 else 0
    ce_sum, labels_valid = float(sums[0]), int(sums[1])
    top1, topk_hits, num_latents = (float(sums[2]), float(sums[3])), (float(sums[4]), float(sums[5])), int(sums[6])
    return {"concept_loss": ce_sum / labels_valid if labels_valid else math.nan,
            "concept_top1_acc": top1[0] / top1[1] if top1[1] else math.nan,
            "concept_topk_acc": topk_hits[0] / topk_hits[1] if topk_hits[1] else math.nan,
            "concept_topk": topk, "concept_label_count": labels_valid, "concept_tokens": int(windows.numel()),
            "concept_chance_top1": 1.0 / num_latents if num_latents else math.nan,
            "concept_chance_topk": topk / num_latents if num_latents else math.nan}


def markdown_table(rows: Sequence[dict]) -> str:
    """One row per model with a concept layer: concept loss, top-1 and top-k accuracy (chance in brackets)."""
    lines = ["| model | concept loss | concept top-1 acc | concept top-k acc | k | labels |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "concept_loss" not in row:
            continue
        lines.append(f"| {row['name']} | {row['concept_loss']:.4f} | {row['concept_top1_acc']:.4f} "
                     f"(chance {row['concept_chance_top1']:.4f}) | {row['concept_topk_acc']:.4f} "
                     f"(chance {row['concept_chance_topk']:.4f}) | {row['concept_topk']} | "
                     f"{row['concept_label_count']:,} |")
    return "\n".join(lines) + "\n"
