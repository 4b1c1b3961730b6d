"""Attribution concept labels: which SAE latents most lower the teacher's next-token loss, per token.

For token ids [b, t], teacher hook h = h_l [b, t, d], its gradient g = dL/dh [b, t, d] (L: per-sequence mean
next-token CE summed over the batch, see teacher.py) and the SAE code of h (k active latents per token):

    act   (default, reference code):  score_i = (g . W_dec[:, i]) * c_i        i among the k active latents
    preact (paper's text, section 3.1): score_i = (g . W_dec[:, i]) * pre_i    i over ALL C latents
    abs:                              score_i = |(g . W_dec[:, i]) * c_i|      i among the k active latents
    labels = indices of the top num_labels scores                          [b, t, num_labels], best first

act and abs: only the k active latents can score non-zero (c_i = 0 elsewhere), so the score is k dot products
per token on the gathered decoder columns ([T, k, d] in chunks), never the dense [T, C] product g @ W_dec.
preact: the pre-activation of an inactive latent is not zero (the paper keeps it "to capture non-activated
concepts"), so every latent scores: the dense g @ W_dec [T, C] times pre [T, C], chunked over tokens so that
memory stays bounded (_DENSE_CHUNK_TOKENS x C floats at a time). (The SAE's de-normalisation multiplies every
latent's effect by the same positive std of the token, which changes no ranking and no sign, so it is left out
as in the reference code.)

Precision: the SAE's dense products (encode, and preact's g @ W_dec) run in the SAE's dtype, which follows the
teacher's (--teacher-dtype; TF32 matmuls inside `teacher.precision()` for tf32); the scores themselves (k dot
products per token, or the [T, C] product of two dense results) are formed in fp32, so close scores keep their
order.

Labels with score <= 0 are -1 (the dense reference's topk would pick arbitrary zero-score latents there), and
so is the whole last position, whose gradient is zero (it predicts nothing inside the window).
`mask_invalid=False` reproduces the reference exactly, with ties broken as a stable dense sort would: among
equal scores, the lowest latent index first (zero-score latents are the inactive ones and the active ones
that score exactly 0).
"""

from __future__ import annotations

import torch

from .sae import TopKSAE, check_sae_compatible
from .teacher import Teacher

ATTRIBUTION_MODES = ("act", "preact", "abs")
_CHUNK_TOKENS = 1024  # bounds the gathered [chunk, k, d] decoder columns to ~100 MB at d = 768, k = 32
_DENSE_CHUNK_TOKENS = 256  # bounds preact's dense [chunk, C] scores to ~32 MB at C = 32768


def check_teacher_sae(teacher: Teacher, sae: TopKSAE) -> None:
    """The SAE must read the teacher's hooked layer: its d_model equals the teacher width."""
    check_sae_compatible(sae, d_model=teacher.d_model,
                         where=f"teacher {teacher.path} layer {teacher.layer} (hidden size)")


@torch.no_grad()
def sparse_attribution_scores(sae: TopKSAE, hidden: torch.Tensor, grad: torch.Tensor,
                              mode: str = "act") -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), each [..., k]: the score of each active latent (act, abs; see module docstring)."""
    if mode not in ATTRIBUTION_MODES or mode == "preact":
        raise ValueError(f"sparse attribution mode {mode!r} is not one of act, abs (preact scores every latent: "
                         f"dense_preact_labels)")
    code = sae.encode_with_stats(hidden.to(sae.dictionary.dtype))
    lead, k = code.indices.shape[:-1], sae.k
    indices = code.indices.reshape(-1, k)
    weight = code.values.reshape(-1, k).float()
    grad = grad.reshape(-1, grad.shape[-1]).float()
    dots = torch.empty_like(weight)
    for start in range(0, indices.shape[0], _CHUNK_TOKENS):
        stop = start + _CHUNK_TOKENS
        columns = sae.decoder_columns(indices[start:stop]).float()  # [chunk, k, d]
        dots[start:stop] = torch.bmm(columns, grad[start:stop].unsqueeze(-1)).squeeze(-1)
    scores = dots * weight
    if mode == "abs":
        scores = scores.abs()
    return scores.reshape(*lead, k), code.indices


def labels_from_scores(scores: torch.Tensor, indices: torch.Tensor, num_labels: int, num_latents: int,
                       mask_invalid: bool = True) -> torch.Tensor:
    """Top `num_labels` latent ids [..., num_labels] from the k active scores [..., k]; the last position of
    the sequence dimension (-2 of `scores`) is masked to -1 when `mask_invalid`."""
    if num_labels < 1:
        raise ValueError(f"--concept-num-labels must be positive, got {num_labels}")
    k = scores.shape[-1]
    if mask_invalid and num_labels > k:
        raise ValueError(f"--concept-num-labels {num_labels} exceeds the SAE's k {k} active latents")
    # Sort by score descending, then latent id ascending (a stable dense sort's tie order).
    order = torch.argsort(indices, dim=-1)
    scores_by_id, ids_by_id = scores.gather(-1, order), indices.gather(-1, order)
    rank = torch.argsort(scores_by_id, dim=-1, descending=True, stable=True)
    top_scores, top_ids = scores_by_id.gather(-1, rank), ids_by_id.gather(-1, rank)
    if mask_invalid:
        labels = top_ids[..., :num_labels].clone()
        labels[top_scores[..., :num_labels] <= 0] = -1
        labels[..., -1, :] = -1
        return labels
    return _reference_fill(top_scores, top_ids, num_labels, num_latents)


def _reference_fill(top_scores: torch.Tensor, top_ids: torch.Tensor, num_labels: int,
                    num_latents: int) -> torch.Tensor:
    """Dense-reference labels: positives first, then zero-score latents by id, then negatives (as topk over C)."""
    lead, k = top_scores.shape[:-1], top_scores.shape[-1]
    flat_scores, flat_ids = top_scores.reshape(-1, k), top_ids.reshape(-1, k)
    out = flat_ids[:, :num_labels].clone() if num_labels <= k else flat_ids.new_empty(flat_ids.shape[0], num_labels)
    # Only rows with fewer than num_labels positive scores need zero-score latents (e.g. the last position).
    short_rows = (flat_scores > 0).sum(-1) < num_labels
    for row in short_rows.nonzero().flatten().tolist():
        s, ids = flat_scores[row].tolist(), flat_ids[row].tolist()
        positive = [i for v, i in zip(s, ids) if v > 0]
        negative = [i for v, i in zip(s, ids) if v < 0]
        chosen, nonzero_active, latent = list(positive), set(positive) | set(negative), 0
        while len(chosen) < num_labels and latent < num_latents:
            if latent not in nonzero_active:
                chosen.append(latent)
            latent += 1
        chosen += negative[:num_labels - len(chosen)]
        out[row] = torch.tensor(chosen, dtype=torch.long)
    return out.view(*lead, num_labels)


@torch.no_grad()
def dense_preact_labels(sae: TopKSAE, hidden: torch.Tensor, grad: torch.Tensor, num_labels: int,
                        mask_invalid: bool = True) -> torch.Tensor:
    """preact labels [b, t, num_labels]: the top scores (g . W_dec[:, i]) * pre_i over all C latents.

    With `mask_invalid`, labels whose score is not positive and the whole last position are -1; without, the
    top num_labels over C whatever their sign (the reference code's topk), ties by lowest latent id."""
    if num_labels < 1:
        raise ValueError(f"--concept-num-labels must be positive, got {num_labels}")
    param_dtype = sae.dictionary.dtype
    lead = hidden.shape[:-1]
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(param_dtype)
    grad = grad.reshape(-1, grad.shape[-1]).to(param_dtype)
    labels = torch.empty(hidden.shape[0], num_labels, dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], _DENSE_CHUNK_TOKENS):
        stop = start + _DENSE_CHUNK_TOKENS
        xn, _, _ = sae.normalize(hidden[start:stop])
        scores = (grad[start:stop] @ sae.W_dec).float() * sae.preactivation(xn).float()  # [chunk, C]
        if mask_invalid:
            top_scores, top_ids = scores.topk(num_labels, dim=-1)
            top_ids[top_scores <= 0] = -1
        else:
            top_ids = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :num_labels]
        labels[start:stop] = top_ids
    labels = labels.view(*lead, num_labels)
    if mask_invalid:
        labels[..., -1, :] = -1
    return labels


def attribution_labels(teacher: Teacher, sae: TopKSAE, tokens: torch.Tensor, num_labels: int = 4,
                       mode: str = "act", mask_invalid: bool = True) -> torch.Tensor:
    """Concept labels [b, t, num_labels] (int64, best first, -1 = no label) for token ids [b, t].

    Runs one teacher forward and a backward from the loss down to the hooked layer only; no weight gradients.
    A sequence's labels do not depend on the other sequences of the batch.
    """
    check_teacher_sae(teacher, sae)
    if mode not in ATTRIBUTION_MODES:
        raise ValueError(f"attribution mode {mode!r} is not one of {', '.join(ATTRIBUTION_MODES)}")
    hidden, grad, _ = teacher.hidden_and_grad(tokens)
    with teacher.precision():
        if mode == "preact":
            return dense_preact_labels(sae, hidden, grad, num_labels, mask_invalid)
        scores, indices = sparse_attribution_scores(sae, hidden, grad, mode)
    return labels_from_scores(scores, indices, num_labels, sae.num_latents, mask_invalid)
