"""CoCoMix concept head: predict SAE concepts from the student's hidden state, keep the top-k logits.

For the hidden state h [s, b, d] at the input of block L (docs/design.md §4):

    xn, mu, std = LN(h)                       # the SAE's layer norm (concepts/sae.py): NOT detached
    z = W_pred (xn - pre_bias) + b_pred       # concept logits [s, b, C]; W_pred: d -> C
    v, idx = TopK_k(z)                        # raw logits (may be negative, no ReLU), k = --concept-topk

Tensor parallel: W_pred is column-parallel over C, like megatron's vocab-parallel output layer, so each TP rank
holds logits for C/tp concepts [s, b, C/tp] (under sequence parallelism the column-parallel linear first
gathers the sequence, so z covers all s positions on every rank). The top-k over C is computed as: local top-k
on each shard, all-gather of the k x tp candidates (values and global ids), global top-k over the candidates.
That is exact: every global top-k element is in its own shard's local top-k. Gradients reach the kept values
only (selection is hard) and flow back to the shard that owns each value through the all-gather's backward.
"""

from __future__ import annotations

from typing import Tuple

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cocomix.concepts.sae import layer_norm_stats


def distributed_topk(local_logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k over a tensor-parallel last dimension. local_logits [..., C/tp] -> (values, global ids) [..., k].

    Values are differentiable; ids are global indices into the full C dimension."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    local_k = min(k, local_logits.shape[-1])
    values, ids = torch.topk(local_logits, local_k, dim=-1)
    if tp_size == 1:
        return values, ids
    offset = parallel_state.get_tensor_model_parallel_rank() * local_logits.shape[-1]
    # [..., local_k * tp]: rank-major candidates; the gather's backward routes each grad to its owner rank.
    all_values = gather_from_tensor_model_parallel_region(values)
    all_ids = gather_from_tensor_model_parallel_region(ids + offset)
    top_values, positions = torch.topk(all_values, k, dim=-1)
    return top_values, torch.gather(all_ids, -1, positions)


class ConceptPredictor(MegatronModule):
    """LN statistics + pre_bias + column-parallel W_pred. Returns (local logits [s, b, C/tp], mu, std)."""

    def __init__(self, config: TransformerConfig, num_concepts: int):
        super().__init__(config=config)
        self.pre_bias = torch.nn.Parameter(torch.zeros(config.hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism pre_bias acts on each rank's sequence shard: its grad is summed over TP.
        setattr(self.pre_bias, "sequence_parallel", config.sequence_parallel)
        self.linear = ColumnParallelLinear(
            config.hidden_size, num_concepts, config=config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=False)

    def forward(self, hidden: torch.Tensor):
        xn, mu, std = layer_norm_stats(hidden)
        logits, _ = self.linear(xn - self.pre_bias)
        return logits, mu, std
