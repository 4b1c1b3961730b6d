"""CoCoMix losses over tensor-parallel shards: the concept cross-entropy and the KD baseline's KL.

Concept loss (docs/design.md §6). Concept logits z are column-parallel over C: each TP rank holds [s, b, C/tp].
For the K_attr labels y_1..y_K of a token (-1 = no label: no positive attribution, or the last position):

    lse    = log sum_c exp(z_c)                       (max and sum all-reduced over TP, as megatron's
                                                       vocab-parallel cross-entropy does)
    CE_k   = lse - z[y_k]                             (z[y_k] read on the rank that owns y_k, all-reduced)
    L_concept = mean over valid (token, k) of CE_k     -> weight --concept-loss-weight (0.1) in the total loss

This is megatron's vocab-parallel cross-entropy, written once for K targets sharing one softmax: megatron's
`vocab_parallel_cross_entropy` works in place on fp32 logits (the same z also feeds the top-k) and takes one
target per position; the tests check this function against it. All-reduces use megatron's autograd-aware
`reduce_from_tensor_model_parallel_region` (forward all-reduce, backward identity), so each rank's gradient is
softmax - onehot on its own shard.

KD baseline (docs/design.md §6): KL(p_teacher || p_student) over the vocabulary, summed over the vocab shards the same
way; the teacher's distribution is restricted to the student's (padded) vocabulary slice on each rank.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def _tp_log_sum_exp(local_logits: torch.Tensor) -> torch.Tensor:
    logits = local_logits.float()
    global_max = logits.max(dim=-1, keepdim=True).values.detach()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_tensor_model_parallel_group())
    sum_exp = reduce_from_tensor_model_parallel_region(torch.exp(logits - global_max).sum(dim=-1, keepdim=True))
    return torch.log(sum_exp) + global_max  # [..., 1]


def _tp_gather_targets(local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """z[target] for targets [..., K] (global ids, -1 allowed) from vocab-parallel logits [..., C/tp]."""
    shard = local_logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    local = targets - start
    owned = (targets >= 0) & (local >= 0) & (local < shard)
    picked = torch.gather(local_logits.float(), -1, torch.where(owned, local, torch.zeros_like(local)))
    return reduce_from_tensor_model_parallel_region(picked * owned)


def concept_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """local_logits [s, b, C/tp], labels [s, b, K] (-1 = ignore) -> (sum of CE over valid labels, count)."""
    valid = labels >= 0
    ce = _tp_log_sum_exp(local_logits) - _tp_gather_targets(local_logits, labels)  # [s, b, K]
    return (ce * valid).sum(), valid.sum()


@torch.no_grad()
def concept_accuracy(top_ids: torch.Tensor, labels: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """top_ids [s, b, k] (student's top-k concepts, best first), labels [s, b, K].

    top-1: the student's best concept equals the first (highest-attribution) label, over tokens with a label.
    top-K: fraction of valid labels found among the student's top-k predictions."""
    first_valid = labels[..., 0] >= 0
    top1_hits = (top_ids[..., 0] == labels[..., 0]) & first_valid
    valid = labels >= 0
    in_topk = (labels.unsqueeze(-1) == top_ids.unsqueeze(-2)).any(dim=-1) & valid
    return {
        "concept top1 acc": (top1_hits.sum().float(), first_valid.sum().float()),
        "concept topk acc": (in_topk.sum().float(), valid.sum().float()),
    }


def kd_kl_divergence(student_local_logits: torch.Tensor, teacher_log_probs: torch.Tensor,
                     loss_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) summed over masked tokens.

    student_local_logits [b, s, V'/tp] (this rank's slice of the padded vocabulary), teacher_log_probs
    [b, s, V] over the teacher's vocabulary (ids shared with the student's; ids >= V have p_teacher = 0).
    Returns (sum over tokens of KL, number of tokens)."""
    shard = student_local_logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    teacher_slice = teacher_log_probs[..., start:start + shard].float()
    logits = student_local_logits[..., :teacher_slice.shape[-1]].float()  # padded rows carry no teacher mass
    p_teacher = teacher_slice.exp()
    # KL = sum_v p_t (log p_t - z_v) + lse(z) * sum_v p_t. The first term and the teacher mass are sums over
    # shards; lse is already the same on every rank, so its gradient is not summed twice across ranks.
    cross = torch.where(p_teacher > 0, p_teacher * (teacher_slice - logits), torch.zeros_like(p_teacher))
    cross = reduce_from_tensor_model_parallel_region(cross.sum(dim=-1))  # [b, s]
    mass = p_teacher.sum(dim=-1)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(mass, group=parallel_state.get_tensor_model_parallel_group())
    kl = cross + _tp_log_sum_exp(student_local_logits).squeeze(-1) * mass
    mask = loss_mask.float()
    return (kl * mask).sum(), mask.sum()
