"""CoCoMix concept mixing, built by megatron-core's TransformerBlock as layer L of the stack (docs/design.md §4).

At the input of block L, for h [s, b, d] (a sequence shard [s/tp, b, d] under sequence parallelism):

    z, mu, std = ConceptPredictor(h)                 # concept_head.py: z [s, b, C/tp] column-parallel
    v, idx     = TopK_k(z)                           # k = 32, global ids, exact across TP shards
    c^         = (W_comp v + b_comp + pre_bias) * std + mu      # W_comp: C -> d, only k columns per token
    h'         = interleave(h, c^) = [h_1, c^_1, h_2, c^_2, ...]  # [2s, b, d] for every block >= L

Sparse compression: W_comp is sharded over C like W_pred ([C/tp, d] rows per rank). Each rank sums the columns
it owns among the k selected, weighted by their values (an embedding-bag: the same maths as W_comp applied to
the masked dense vector, with k instead of C multiply-adds per token), then the partial sums are all-reduced
over TP (reduce-scattered along the sequence under sequence parallelism, which also returns each rank's shard).

Interleaving is local to each rank's sequence shard, so under sequence parallelism the concatenated shards are
still [h_1, c^_1, ...]. Blocks above L use a plain causal mask over 2s positions; with rotary embeddings a
concept slot takes its token's position (the rotary table is indexed by token, repeated twice); learned
absolute positions were added once at the input. The last block returns the concept slots [1::2] only, so the
final norm and output layer produce next-token logits from the concept slots.

The concept labels for the concept loss travel in the TransformerBlock's `context` argument: megatron passes it
to every layer and saves it for activation recomputation (GPT layers have no cross-attention to read it).
The concept loss joins the main loss through megatron's MoEAuxLossAutoScaler (its gradient is injected where the
layer lives, on any pipeline stage); its value and accuracies go to megatron_cocomix/metrics.py for the log line.

Ablations: --concept-mixing add (h + c^, s positions), none (concept prediction only); --pause-tokens
interleaves one learned vector instead of c^.
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from megatron_cocomix import metrics
from megatron_cocomix.model.concept_head import ConceptPredictor, distributed_topk
from megatron_cocomix.model.losses import concept_accuracy, concept_cross_entropy

CONCEPT_METRICS = ("concept loss", "concept top1 acc", "concept topk acc", "concept dead columns")
DEAD_COLUMN_NORM = 1e-3


def interleave(tokens: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """[s, b, d] x2 -> [2s, b, d] = [t_1, c_1, t_2, c_2, ...]."""
    s, b, d = tokens.shape
    return torch.stack([tokens, concepts], dim=1).reshape(2 * s, b, d)


def concept_slots(hidden: torch.Tensor) -> torch.Tensor:
    """[2s, b, d] -> the concept slots [s, b, d] (positions 1, 3, 5, ...)."""
    return hidden[1::2]


def rotary_for_slots(rotary_pos_emb: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Rotary table for 2s slots where slot i has token i // 2's position: [>= s, ...] -> [2s, ...]."""
    return rotary_pos_emb[:num_tokens].repeat_interleave(2, dim=0)


def mask_for_slots(attention_mask: torch.Tensor) -> torch.Tensor:
    """Megatron mask (True = masked) [b, 1, s, s] -> [b, 1, 2s, 2s]: slot (i, j) follows tokens (i//2, j//2),
    plus causality over the 2s slots (a token slot may not see its own concept slot)."""
    doubled = attention_mask.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    n = doubled.shape[-1]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=doubled.device), diagonal=1)
    return doubled | future


@torch.compiler.disable
def doubled_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """mask_for_slots, built once per mask tensor and kept on it: every doubled layer of a forward (and of its
    recomputation) is handed the same mask, so a forward builds one [b, 1, 2s, 2s] mask, not one per layer."""
    cached = getattr(attention_mask, "_slots_mask", None)
    if cached is None:
        cached = mask_for_slots(attention_mask)
        attention_mask._slots_mask = cached
    return cached


def sparse_compress(values: torch.Tensor, ids: torch.Tensor, local_weight: torch.Tensor,
                    sequence_parallel: bool) -> torch.Tensor:
    """sum_j values[..., j] * W_comp[ids[..., j]] over all TP shards.

    values, ids [s, b, k]; local_weight [C/tp, d] (this rank's concepts). Returns [s, b, d], or this rank's
    sequence shard [s/tp, b, d] under sequence parallelism."""
    s, b, k = ids.shape
    shard = local_weight.shape[0]
    local = ids - parallel_state.get_tensor_model_parallel_rank() * shard
    owned = (local >= 0) & (local < shard)
    weights = values * owned.to(values.dtype)
    # In fp32: CUDA has no bf16 / fp16 backward for embedding_bag's per-sample weights (the weight's gradient
    # comes back in its own dtype through the cast).
    out = F.embedding_bag(torch.where(owned, local, torch.zeros_like(local)).reshape(s * b, k), local_weight.float(),
                          per_sample_weights=weights.reshape(s * b, k).float(), mode="sum")
    out = out.reshape(s, b, -1).to(local_weight.dtype)
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return out
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(out)
    return reduce_from_tensor_model_parallel_region(out)


class ConceptMixing(MegatronModule):
    """Concept prediction, sparse compression and mixing; returns the stream the blocks above L see."""

    def __init__(self, config: TransformerConfig, num_concepts: int, topk: int, mixing: str, loss_weight: float):
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if num_concepts % tp != 0:
            raise ValueError(f"--concept-dim {num_concepts} is not divisible by --tensor-model-parallel-size {tp}")
        self.num_concepts, self.topk, self.mixing, self.loss_weight = num_concepts, topk, mixing, loss_weight
        self.predictor = ConceptPredictor(config, num_concepts)
        # Rows = concepts, like an embedding table: sharded over C on dim 0, as the predictor's output dim.
        self.compress_weight = torch.nn.Parameter(torch.empty(num_concepts // tp, config.hidden_size,
                                                              dtype=config.params_dtype))
        setattr(self.compress_weight, "tensor_model_parallel", tp > 1)
        setattr(self.compress_weight, "partition_dim", 0)
        setattr(self.compress_weight, "partition_stride", 1)
        self.compress_bias = torch.nn.Parameter(torch.zeros(config.hidden_size, dtype=config.params_dtype))
        setattr(self.compress_bias, "sequence_parallel", config.sequence_parallel)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The compression rows are sharded over C like the predictor's (megatron's default would call every
        parameter of a plain module replicated)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}compress_weight"
        state[key] = make_tp_sharded_tensor_for_checkpoint(self.compress_weight, key, tp_axis=0,
                                                           prepend_offsets=sharded_offsets)
        return state

    def forward(self, hidden: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        logits, mu, std = self.predictor(hidden)
        loss = None
        if labels is not None:
            ce_sum, count = concept_cross_entropy(logits, labels)
            metrics.record("concept loss", ce_sum, count)
            if self.loss_weight > 0:
                loss = self.loss_weight * ce_sum / count.clamp(min=1)
        values, ids = distributed_topk(logits, self.topk)
        if labels is not None:
            for name, (hits, total) in concept_accuracy(ids, labels).items():
                metrics.record(name, hits, total)
        with torch.no_grad():
            norms = self.compress_weight.float().norm(dim=-1)
            dead = (norms < DEAD_COLUMN_NORM).sum().float()
            if parallel_state.get_tensor_model_parallel_world_size() > 1:
                torch.distributed.all_reduce(dead, group=parallel_state.get_tensor_model_parallel_group())
            metrics.record("concept dead columns", dead, torch.full_like(dead, float(self.num_concepts)))

        if self.mixing == "none":
            out = hidden
        else:
            compressed = sparse_compress(values, ids, self.compress_weight, self.config.sequence_parallel)
            concept = ((compressed + self.compress_bias + self.predictor.pre_bias) * std + mu).to(hidden.dtype)
            out = interleave(hidden, concept) if self.mixing == "interleave" else hidden + concept
        if loss is not None:
            out = MoEAuxLossAutoScaler.apply(out, loss)
        return out


class PauseMixing(MegatronModule):
    """Pause-token baseline: the same learned vector after every token (same 2T compute as CoCoMix)."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        self.pause_embedding = torch.nn.Parameter(torch.empty(config.hidden_size, dtype=config.params_dtype))
        setattr(self.pause_embedding, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return interleave(hidden, self.pause_embedding.expand_as(hidden).to(hidden.dtype))


class CoCoMixTransformerLayer(TransformerLayer):
    """A megatron TransformerLayer at depth >= L: optionally mixes concepts in first (depth L), runs on 2s
    positions when interleaving, and the last one returns the concept slots."""

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection=None, vp_stage: Optional[int] = None,
                 mixing_module: Optional[Callable[[TransformerConfig], MegatronModule]] = None,
                 doubled: bool = False, is_last_layer: bool = False):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage)
        self.concept_mixing = mixing_module(config) if mixing_module is not None else None
        self.doubled = doubled
        self.returns_concept_slots = doubled and is_last_layer

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron stacks the layers' tensors along a prepended layer axis ('decoder.layers.<name>' of shape
        [num_layers, ...]); only one layer holds the concept mixing, so its tensors get keys without that axis."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.concept_mixing is not None:
            own = f"{prefix}concept_mixing."
            state = {key: value for key, value in state.items() if not key.startswith(own)}
            state.update(self.concept_mixing.sharded_state_dict(prefix=own, sharded_offsets=(), metadata=metadata))
        return state

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        hidden = hidden_states
        context = kwargs.get("context")
        if self.concept_mixing is not None:
            hidden = self.concept_mixing(hidden, labels=context)
        kwargs["context"] = None
        if self.doubled:
            tp = parallel_state.get_tensor_model_parallel_world_size() if self.config.sequence_parallel else 1
            num_tokens = hidden.shape[0] * tp // 2
            if kwargs.get("rotary_pos_emb") is not None:
                kwargs["rotary_pos_emb"] = rotary_for_slots(kwargs["rotary_pos_emb"], num_tokens)
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = doubled_mask(kwargs["attention_mask"])
        output, _ = super().forward(hidden, *args, **kwargs)
        if self.returns_concept_slots:
            output = concept_slots(output)
        return output, context


def concept_layer_spec_for(args: argparse.Namespace, base_spec: ModuleSpec) -> Callable[[int], ModuleSpec]:
    """`layer_spec_for(global_index)` for gpt_block_spec: layers >= --concept-layer become CoCoMix layers."""
    concept_layer, num_layers = args.concept_layer, args.num_layers
    doubled = args.pause_tokens or args.concept_mixing == "interleave"
    if args.pause_tokens:
        mixing_module = PauseMixing
    else:
        def mixing_module(config: TransformerConfig) -> ConceptMixing:
            weight = 0.0 if args.no_concept_loss else args.concept_loss_weight
            return ConceptMixing(config, args.concept_dim, args.concept_topk, args.concept_mixing, weight)

    def spec_for(index: int) -> ModuleSpec:
        if index < concept_layer:
            return base_spec
        return ModuleSpec(module=CoCoMixTransformerLayer, submodules=base_spec.submodules,
                          params={"mixing_module": mixing_module if index == concept_layer else None,
                                  "doubled": doubled, "is_last_layer": index == num_layers - 1})

    return spec_for


def find_concept_mixing(module: torch.nn.Module) -> Optional[torch.nn.Module]:
    for sub in module.modules():
        if isinstance(sub, (ConceptMixing, PauseMixing)):
            return sub
    return None
