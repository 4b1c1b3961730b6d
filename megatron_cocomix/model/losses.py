"""CoCoMix losses over tensor-parallel shards: the concept cross-entropy and the KD baseline's KL.

Concept loss (docs/design.md §6). Concept logits z are column-parallel over C: each TP rank holds [s, b, C/tp].
For the K_attr labels y_1..y_K of a token (-1 = no label: no positive attribution, or the last position):

    M      = max_c z_c                                (all-reduced MAX over TP)
    CE_k   = log sum_c exp(z_c - M) - (z[y_k] - M)    (z[y_k] read on the rank that owns y_k; both sums
                                                       all-reduced over TP in one call)
    L_concept = mean over valid (token, k) of CE_k     -> weight --concept-loss-weight (0.1) in the total loss

This is megatron's vocab-parallel cross-entropy, written once for K targets sharing one softmax (megatron's
`vocab_parallel_cross_entropy` takes one target per position and works in place on its input, which the top-k
also reads); the tests check this function against it. Like megatron's, it is an autograd Function with one fp32
buffer of the logits' shape (exp, then softmax, then the gradient, in place) and a backward without
communication: each rank's gradient is softmax - onehot on its own shard. The K target logits are gathered
before any upcast, so bf16 logits get one fp32 copy, not one per step of the formula.

KD baseline (docs/design.md §6): KL(p_teacher || p_student) over the vocabulary, summed over the vocab shards the same
way; the teacher's distribution is restricted to the student's (padded) vocabulary slice on each rank. It runs a
chunk of tokens at a time, so no [b, s, V] fp32 temporary exists besides the teacher's log-probs.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from megatron.core import parallel_state


class _ConceptCrossEntropy(torch.autograd.Function):
    """CE_k = log sum_c exp(z_c - M) - (z[y_k] - M) for K targets sharing one softmax, M the global max.

    Memory: one fp32 buffer of the logits' shape, reused in place for exp, softmax and the gradient (megatron's
    vocab-parallel cross-entropy does the same for one target); the K target logits are gathered from the
    logits as they come (bf16 in bf16 training) and only those K values are upcast."""

    @staticmethod
    def forward(ctx, local_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        shard = local_logits.shape[-1]
        local = labels - parallel_state.get_tensor_model_parallel_rank() * shard
        owned = (labels >= 0) & (local >= 0) & (local < shard)
        index = torch.where(owned, local, torch.zeros_like(local))
        picked = torch.gather(local_logits, -1, index).float()  # [..., K]

        work = local_logits.to(torch.float32, copy=True)  # never the caller's tensor: top-k reads it too
        logits_max = work.amax(dim=-1, keepdim=True)
        if tp > 1:
            torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=group)
        work.sub_(logits_max).exp_()
        # One all-reduce for both sums: the shifted target logits (0 where another rank owns y_k) and sum exp.
        sums = torch.cat([(picked - logits_max) * owned, work.sum(dim=-1, keepdim=True)], dim=-1)
        if tp > 1:
            torch.distributed.all_reduce(sums, group=group)
        shifted_target, sum_exp = sums[..., :-1], sums[..., -1:]
        work.div_(sum_exp)  # softmax, kept for the backward
        ctx.save_for_backward(work, index, owned)
        ctx.logits_dtype = local_logits.dtype
        return torch.log(sum_exp) - shifted_target

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor):
        # dCE_k/dz = softmax - onehot(y_k) on the rank that owns y_k; summed over the K targets. In place on the
        # saved softmax, so this backward runs once (as megatron's).
        softmax, index, owned = ctx.saved_tensors
        grad = softmax.mul_(grad_ce.sum(dim=-1, keepdim=True))
        grad.scatter_add_(-1, index, -(grad_ce * owned))
        return grad.to(ctx.logits_dtype), None


def concept_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """local_logits [s, b, C/tp], labels [s, b, K] (-1 = ignore) -> (sum of CE over valid labels, count)."""
    valid = labels >= 0
    ce = _ConceptCrossEntropy.apply(local_logits, labels)  # [s, b, K]
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


# Logits per chunk of the KD loss (chunk rows x V): one fp32 temporary of that size at a time instead of several of
# [b, s, V]. On CPU a chunk that stays in cache makes the elementwise passes ~3x faster (4 MB: 1.0 -> 0.3 s per
# step at 1024 tokens x 49152 on 2 cores); on a GPU large chunks keep the number of kernel launches small.
KD_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}


def _kd_chunks(logits: torch.Tensor):
    rows, width = logits.shape
    step = max(1, KD_CHUNK_ELEMENTS.get(logits.device.type, KD_CHUNK_ELEMENTS["cuda"]) // max(width, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


class _KDKLDivergence(torch.autograd.Function):
    """Per-token KL(p_t || softmax(z)) over the vocabulary shards, a chunk of tokens at a time.

    For a token with student logits z (this rank's shard, padded rows included) and teacher log-probs log p_t
    restricted to the shard's ids:

        M      = max_v z_v                                  (all-reduced MAX over TP)
        lse    = M + log sum_v exp(z_v - M)                 (the sum all-reduced over TP)
        cross  = sum_v p_t,v (log p_t,v - z_v)              (summed over TP; 0 where p_t,v = 0)
        mass   = sum_v p_t,v                                (1 over the whole vocabulary)
        KL     = cross + lse x mass
        dKL/dz_v = mass x softmax(z)_v - p_t,v              (no communication: each rank owns its shard)

    Nothing of the [tokens, V] shape is kept but the inputs; the backward recomputes softmax per chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        rows = logits.shape[0]
        logits_max = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for a, b in _kd_chunks(logits):
            logits_max[a:b] = logits[a:b].float().amax(dim=-1)
        if tp > 1:
            torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=group)
        sums = torch.empty(3, rows, dtype=torch.float32, device=logits.device)  # sum exp, cross, mass
        teacher_width = teacher_log_probs.shape[-1]
        for a, b in _kd_chunks(logits):
            z = logits[a:b].float()
            log_p = teacher_log_probs[a:b].float()
            p = log_p.exp()
            sums[0, a:b] = (z - logits_max[a:b, None]).exp_().sum(dim=-1)
            sums[1, a:b] = torch.where(p > 0, p * (log_p - z[:, :teacher_width]), 0.0).sum(dim=-1)
            sums[2, a:b] = p.sum(dim=-1)
        if tp > 1:
            torch.distributed.all_reduce(sums, group=group)
        lse = sums[0].log() + logits_max
        ctx.save_for_backward(logits, teacher_log_probs, lse, sums[2].clone())
        return sums[1] + lse * sums[2]

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        logits, teacher_log_probs, lse, mass = ctx.saved_tensors
        teacher_width = teacher_log_probs.shape[-1]
        grad = torch.empty_like(logits)
        for a, b in _kd_chunks(logits):
            g = grad_kl[a:b, None].float()
            work = logits[a:b].float().sub_(lse[a:b, None]).exp_().mul_(mass[a:b, None] * g)
            work[:, :teacher_width].sub_(teacher_log_probs[a:b].float().exp() * g)
            grad[a:b] = work
        return grad, None


def kd_kl_divergence(student_local_logits: torch.Tensor, teacher_log_probs: torch.Tensor,
                     loss_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) summed over masked tokens.

    student_local_logits [b, s, V'/tp] (this rank's slice of the padded vocabulary), teacher_log_probs
    [b, s, V] over the teacher's vocabulary (ids shared with the student's; ids >= V have p_teacher = 0).
    Returns (sum over tokens of KL, number of tokens). The KL is computed by _KDKLDivergence, a chunk of tokens at
    a time (the padded rows enter the student's softmax and carry no teacher mass)."""
    shard = student_local_logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    teacher_slice = teacher_log_probs[..., start:start + shard]
    lead = student_local_logits.shape[:-1]
    kl = _KDKLDivergence.apply(student_local_logits.reshape(-1, shard),
                               teacher_slice.reshape(-1, teacher_slice.shape[-1]))
    mask = loss_mask.float()
    return (kl.view(lead) * mask).sum(), mask.sum()
