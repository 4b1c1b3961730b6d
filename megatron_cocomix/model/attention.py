"""Core attention on torch's `scaled_dot_product_attention`, a drop-in for megatron-core's `DotProductAttention`.

megatron-core's local `DotProductAttention` materialises the scores [b, np, sq, sk] and runs an unfused
softmax and dropout; without Transformer Engine that is the slowest part of a GPU step (a 386M model ran at
46k tokens/s with it against 103k with SDPA on one H200). SDPA picks flash / memory-efficient kernels on GPU
and a fused math kernel on CPU, from the same call.

    query [sq, b, np, hn], key / value [sk, b, ng, hn]   (np heads, ng query groups on this TP rank)
    context = softmax(q k^T * scale + causal_or_given_mask) v                       -> [sq, b, np * hn]

Grouped-query attention is passed to SDPA (`enable_gqa`), so K/V are never repeated in memory. A megatron
attention mask (True = masked out, [b or 1, 1, sq, sk]) is inverted to SDPA's (True = attend); without a mask
and with a causal mask type, SDPA's `is_causal` fast path is used. Attention dropout under tensor parallelism
draws from the tensor-parallel RNG stream, as megatron's module does, so dropout masks differ across heads
held by different ranks and recomputation replays the same mask.

`cudnn_first` (--attention-backend sdpa-cudnn) puts cuDNN's attention first in SDPA's backend order (torch tries
flash first by default); where cuDNN cannot run the call (CPU, an unsupported shape or dtype) SDPA goes on down
the order, so the same call runs everywhere.

The output copy: SDPA returns [b, np, sq, hn]; the layout megatron wants is [sq, b, np * hn]. The flash and cuDNN
kernels allocate their output in the memory order of the query, which here is [sq, b, np, hn] (the permute below
is a view of megatron's [s, b, ...] projection), so the final permute + reshape is a view there and copies
nothing; kernels that return a contiguous [b, np, sq, hn] (CPU, math) pay one copy.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch.nn.attention import SDPBackend, sdpa_kernel

# --attention-backend sdpa-cudnn: SDPA's backends in this order of preference.
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


@torch.compiler.disable
def sdpa_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Megatron's mask (True = masked out) -> SDPA's (True = attend). Computed once per mask tensor: every layer
    of a forward (and its recomputation) is handed the same mask, so the result is kept on the mask itself."""
    cached = getattr(attention_mask, "_sdpa_mask", None)
    if cached is None:
        cached = ~attention_mask.to(torch.bool)
        attention_mask._sdpa_mask = cached
    return cached


class SDPAttention(MegatronModule):
    """Causal (or masked) core attention through `torch.nn.functional.scaled_dot_product_attention`."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        cudnn_first: bool = False,
    ):
        super().__init__(config=config)
        self.cudnn_first = cudnn_first
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if pg_collection is not None:
            tp_size = pg_collection.tp.size()
        else:
            from megatron.core import parallel_state

            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling is a fp16 overflow workaround of the local "
                             "attention; SDPAttention computes the softmax in fp32 internally")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))

        attend = None
        is_causal = False
        if attention_mask is not None:
            attend = sdpa_mask(attention_mask)
        elif mask_type == AttnMaskType.causal:
            is_causal = True

        dropout_p = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=attend, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale,
                      enable_gqa=self.heads_per_partition != self.groups_per_partition)
        with contextlib.ExitStack() as scope:
            if self.cudnn_first:
                scope.enter_context(sdpa_kernel(CUDNN_FIRST, set_priority=True))
            if dropout_p > 0.0 and not self.config.sequence_parallel:
                scope.enter_context(tensor_parallel.get_cuda_rng_tracker().fork())
            context = F.scaled_dot_product_attention(q, k, v, **kwargs)

        # [b, heads, sq, hn] -> [sq, b, heads * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
