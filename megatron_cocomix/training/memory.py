"""Parameter counts and a memory estimate per device, for the start-up report.

Parameters and memory per device
--------------------------------
Per-stage parameters follow megatron-core's GPTModel (embedding + learned positions on the first stage,
final norm + output layer on the last; with tied embeddings and PP > 1 the last stage holds its own copy of
the word embeddings). Bytes per parameter (p on this device, D data-parallel ranks):
    megatron, bf16/fp16:  2 weights + 4 fp32 grads + 12 (fp32 master, Adam m, v); distributed optimizer: 12/D
    megatron, fp32:       4 + 4 + 8 (Adam m, v);                                   distributed optimizer:  8/D
    DeepSpeed ZeRO-z:     optimizer states / D for z >= 1, grads / D for z >= 2, weights / D for z = 3
Activations per transformer layer per micro-batch (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models"), e bytes per activation element, t = TP, sequence parallelism
divides the first group by t as well:
    (4e + 2 masks) s b h           norm inputs, QKV and fc1 inputs, two dropout masks      [/t with SP]
    e s b (2q + 2kv + f (2|3))    Q, K, V, projection input, MLP activation and fc2 inputs          [/t]
    local attention: (2e + 1) a s^2 b (softmax, dropout mask, dropout output; e without dropout)    [/t]
    SDPA attention:  e s b q + 4 a s b (kernel output and fp32 log-sum-exp; no s^2 term)           [/t]
The classic h = 4h, 16-bit, dropout, local attention case gives s b h (10 + 24/t + 5 a s / (h t)).
Full recompute keeps only each recomputed layer's input (e s b h [/t with SP]) plus one layer's working
set; selective recompute drops the s^2 term. With 1F1B, stage r holds min(PP - r, M) micro-batches in
flight; the interleaved schedule multiplies by (1 + (PP - 1) / (PP v)).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_cocomix.shapes import TransformerShape
from megatron_cocomix.training.flops import layer_positions, recomputed_layers

# ---------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ParameterCounts:
    """Parameters per pipeline stage: `split` is sharded over TP ranks, `replicated` is not."""

    split: List[int] = field(default_factory=list)
    replicated: List[int] = field(default_factory=list)
    unique_total: int = 0

    def stage_total(self, stage: int) -> int:
        return self.split[stage] + self.replicated[stage]

    def per_device(self, stage: int, tp: int) -> float:
        return self.split[stage] / tp + self.replicated[stage]


def layer_parameters(args: argparse.Namespace) -> tuple:
    """(TP-sharded, replicated) parameter counts of one megatron-core transformer layer."""
    shape = TransformerShape.from_args(args)
    h, q, kv, f = shape.hidden_size, shape.query_size, shape.kv_size, shape.ffn_hidden_size
    bias = 0 if args.disable_bias_linear else 1
    norm = 2 * h if args.normalization == "LayerNorm" else h
    fc1_out = f * (2 if shape.gated_mlp else 1)
    split = h * (q + 2 * kv) + bias * (q + 2 * kv) + q * h + h * fc1_out + bias * fc1_out + f * h
    replicated = 2 * norm + bias * 2 * h  # the two norms; row-parallel biases (projection, fc2) are whole
    return split, replicated


def parameter_counts(args: argparse.Namespace) -> ParameterCounts:
    """Student parameters per pipeline stage (CoCoMix predictor/compression on the stage of --concept-layer)."""
    shape = TransformerShape.from_args(args)
    pp = args.pipeline_model_parallel_size
    h, vocab = args.hidden_size, shape.vocab_size
    layer_split, layer_repl = layer_parameters(args)
    per_stage = args.num_layers // pp
    counts = ParameterCounts(split=[per_stage * layer_split] * pp, replicated=[per_stage * layer_repl] * pp)
    norm = 2 * h if args.normalization == "LayerNorm" else h
    counts.split[0] += vocab * h
    if args.position_embedding_type == "learned_absolute":
        counts.replicated[0] += args.max_position_embeddings * h
    counts.replicated[-1] += norm
    untied = args.untie_embeddings_and_output_weights
    if untied or pp > 1:
        counts.split[-1] += vocab * h
    counts.unique_total = sum(counts.split) + sum(counts.replicated) - (0 if untied or pp == 1 else vocab * h)
    if args.cocomix and args.concept_layer is not None:
        concepts = args.concept_dim or 0
        stage = min(args.concept_layer // per_stage, pp - 1)
        # Predictor weight [C, h] + bias [C] and compression weight [h, C], all sharded over C; compression
        # bias [h] and the SAE-style pre_bias [h] are whole.
        counts.split[stage] += 2 * concepts * h + concepts
        counts.replicated[stage] += 2 * h
        counts.unique_total += 2 * concepts * h + concepts + 2 * h
    return counts


# ---------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    """Bytes on the most loaded device of one pipeline stage."""

    stage: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    notes: List[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def _zero_stage(args: argparse.Namespace) -> Optional[int]:
    if not args.deepspeed:
        return None
    config = args.deepspeed_config_dict or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def layer_activation_bytes(args: argparse.Namespace, num_tokens: int) -> float:
    """Activation bytes one layer keeps for backward, per micro-batch per TP rank (no recompute)."""
    shape = TransformerShape.from_args(args)
    t = args.tensor_model_parallel_size
    sp = t if args.sequence_parallel else 1
    e = 2 if (args.bf16 or args.fp16) else 4
    n, b, h = num_tokens, args.micro_batch_size, args.hidden_size
    q, kv, f, a = shape.query_size, shape.kv_size, shape.ffn_hidden_size, shape.num_attention_heads
    masks = 2 if args.hidden_dropout > 0 else 0
    sequence_part = (4 * e + masks) * n * b * h / sp
    mlp_activation = f * (2 if shape.gated_mlp else 1)
    tensor_part = e * n * b * (2 * q + 2 * kv + mlp_activation + f) / t
    if args.attention_backend == "local":
        per_score = (2 * e + 1) if args.attention_dropout > 0 else e
        if args.recompute_granularity == "selective":
            per_score = 0
        scores = per_score * a * n * n * b / t
    else:
        scores = (e * n * b * q + 4 * a * n * b) / t
    return sequence_part + tensor_part + scores


def memory_estimate(args: argparse.Namespace) -> List[MemoryEstimate]:
    """Per pipeline stage: weights, grads, optimizer states and activations on one device of that stage."""
    counts = parameter_counts(args)
    shape = TransformerShape.from_args(args)
    t, pp, dp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size
    vp = args.virtual_pipeline_model_parallel_size or 1
    sixteen = args.bf16 or args.fp16
    e = 2 if sixteen else 4
    zero = _zero_stage(args)
    positions = layer_positions(args)
    per_stage = args.num_layers // pp
    recomputed = set(recomputed_layers(args))
    sp = t if args.sequence_parallel else 1
    s, b, h = args.seq_length, args.micro_batch_size, args.hidden_size
    estimates = []
    for stage in range(pp):
        p = counts.per_device(stage, t)
        notes = []
        if zero is None:
            weights, grads = (2 if sixteen else 4) * p, 4 * p
            optimizer = (12 if sixteen else 8) * p / (dp if args.use_distributed_optimizer else 1)
            notes.append("megatron DDP" + (" + distributed optimizer" if args.use_distributed_optimizer else ""))
        else:
            weights = (2 if sixteen else 4) * p / (dp if zero >= 3 else 1)
            grads = (2 if sixteen else 4) * p / (dp if zero >= 2 else 1)
            optimizer = (12 if sixteen else 8) * p / (dp if zero >= 1 else 1)
            notes.append(f"DeepSpeed ZeRO-{zero}")
        # Layers of this stage (with virtual pipelining each stage holds vp interleaved chunks).
        chunk = args.num_layers // (pp * vp)
        layers = [c * pp * chunk + stage * chunk + i for c in range(vp) for i in range(chunk)] if vp > 1 else \
            list(range(stage * per_stage, (stage + 1) * per_stage))
        stored, working = 0.0, 0.0
        for i in layers:
            full = layer_activation_bytes(args, positions[i])
            working = max(working, full)
            stored += e * positions[i] * b * h / sp if i in recomputed else full
        if recomputed & set(layers):
            stored += working
            notes.append("full recompute: layer inputs kept")
        elif args.recompute_granularity == "selective":
            notes.append("selective recompute")
        if stage == 0:
            stored += (1 if args.hidden_dropout > 0 else 0) * s * b * h / sp
        if stage == pp - 1:
            # Final norm and output-layer inputs, and the fp32 logits the vocab-parallel cross-entropy keeps.
            stored += 2 * e * s * b * h / sp + 4.0 * s * b * shape.vocab_size / t
        if args.cocomix and args.concept_layer is not None and \
                min(args.concept_layer // per_stage, pp - 1) == stage and args.concept_dim:
            stored += e * s * b * h / sp + 4.0 * s * b * args.concept_dim / t
        in_flight = min(pp - stage, args.num_micro_batches)
        factor = in_flight * (1 + (pp - 1) / (pp * vp) if vp > 1 else 1)
        notes.append(f"{factor:g} micro-batches of activations in flight")
        estimates.append(MemoryEstimate(stage, weights, grads, optimizer, stored * factor, notes))
    return estimates
