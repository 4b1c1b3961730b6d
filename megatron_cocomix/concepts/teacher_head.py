"""The teacher's next-token loss without its [tokens x V] logits: a chunked linear cross-entropy.

For the teacher's final hidden states x [T, d] (after its final norm), its output embedding W [V, d] and the
next-token targets y [T] (-100 = ignored):

    z_i  = W x_i                       computed for a chunk of tokens at a time, never for all T at once
    CE_i = logsumexp(z_i) - z_i[y_i]   in fp32 (the logits are upcast per chunk), 0 where y_i is ignored
    dCE_i/dx_i = (softmax(z_i) - onehot(y_i)) W         computed in the same pass, per chunk

The Hugging Face head computes the same z for all T tokens at once in the model's dtype, and the loss upcasts
them: for GPT-2 at 8 x 1024 tokens that is 1.6 GB of fp32 logits plus as much again for their gradient. Here one
chunk (at most CHUNK_ELEMENTS logits) is alive at a time, and the backward only scales the per-token gradient
saved by the forward ([T, d]) by dL/dCE_i, so the head's matmuls are the same two as before (logits, then the
gradient w.r.t. x; the weights are frozen, so there is no weight gradient).

The vocabulary is padded to a multiple of PAD_MULTIPLE rows (GPT-2's 50257 -> 50304) with zero rows whose logits
are -inf before the softmax, so the padding changes no number: odd leading dimensions are slow on tensor cores.

Used where the model's logits are exactly `output_embeddings(base_model(...).last_hidden_state)`
(`supports_chunked_head`: GPT-2 and the Llama family); other architectures keep the model's own head.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

TEACHER_LM_HEADS = ("chunked", "full")
PAD_MULTIPLE = 64
CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 256 MB in fp32
IGNORE_INDEX = -100
# Causal LMs whose logits are the output embedding applied to the base model's last hidden state, with no
# scaling or soft-capping in between.
_PLAIN_HEAD_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


def supports_chunked_head(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return (getattr(model.config, "model_type", None) in _PLAIN_HEAD_MODEL_TYPES and isinstance(head, nn.Linear)
            and head.bias is None and model.base_model is not model)


def _chunk_losses(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                  with_grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """CE [n] (fp32) of one chunk x [n, d], and dCE/dx [n, d] (x's dtype) when `with_grad`."""
    logits = F.linear(x, weight).float()  # [n, V_padded]; a fresh fp32 tensor, worked on in place below
    if weight.shape[0] > vocab_size:
        logits[:, vocab_size:] = float("-inf")
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    ce = torch.where(valid, lse - logits.gather(-1, safe).squeeze(-1), torch.zeros_like(lse))
    if not with_grad:
        return ce, None
    softmax = logits.sub_(lse.unsqueeze(-1)).exp_()
    softmax.scatter_add_(-1, safe, -valid.to(softmax.dtype).unsqueeze(-1))
    softmax.mul_(valid.unsqueeze(-1))
    return ce, softmax.to(x.dtype) @ weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk_tokens):
        ce = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        grad = torch.empty_like(x)
        for start in range(0, x.shape[0], chunk_tokens):
            stop = start + chunk_tokens
            ce[start:stop], grad[start:stop] = _chunk_losses(x[start:stop], weight, targets[start:stop],
                                                             vocab_size, with_grad=True)
        ctx.save_for_backward(grad)
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        (grad,) = ctx.saved_tensors
        return (grad.float() * grad_ce.unsqueeze(-1)).to(grad.dtype), None, None, None, None


class ChunkedLMHead:
    """A frozen output embedding, padded, applied chunk by chunk inside the next-token cross-entropy."""

    def __init__(self, weight: torch.Tensor, chunk_elements: Optional[int] = None,
                 pad_multiple: int = PAD_MULTIPLE):
        if weight.requires_grad:
            raise ValueError("ChunkedLMHead computes no weight gradient: the teacher's weights must be frozen")
        self.vocab_size = weight.shape[0]
        padded = -(-self.vocab_size // pad_multiple) * pad_multiple
        if padded > self.vocab_size:
            weight = torch.cat([weight, weight.new_zeros(padded - self.vocab_size, weight.shape[1])])
        self.weight = weight
        self.chunk_tokens = max(1, (chunk_elements or CHUNK_ELEMENTS) // padded)

    def token_losses(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """x [..., d] final hidden states, targets [...] (IGNORE_INDEX = no loss) -> CE [...] in fp32."""
        lead = targets.shape
        x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        if torch.is_grad_enabled() and x.requires_grad:
            ce = _LinearCrossEntropy.apply(x, self.weight, targets, self.vocab_size, self.chunk_tokens)
        else:
            ce = torch.cat([_chunk_losses(x[i:i + self.chunk_tokens], self.weight, targets[i:i + self.chunk_tokens],
                                          self.vocab_size, with_grad=False)[0]
                            for i in range(0, x.shape[0], self.chunk_tokens)])
        return ce.view(lead)
