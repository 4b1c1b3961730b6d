"""FLOPs, parameter counts and a memory estimate for the configured model and parallel layout.

FLOPs (the PaLM / Narayanan et al. count, as Megatron-LM's `num_floating_point_operations`)
------------------------------------------------------------------------------------------
Only matrix multiplications are counted, 2 FLOPs per multiply-add; norms, softmax, activations, top-k and
the cross-entropy are left out. For one sequence of n tokens, with h hidden, a query heads, g key/value
groups, d_k channels per head (q = a d_k, kv = g d_k), f the MLP width and V the padded vocabulary:

    QKV projection        2 n h (q + 2 kv)                   (grouped-query attention: kv = g d_k)
    attention scores      2 n^2 q  x 1/2                     Q K^T
    attention context     2 n^2 q  x 1/2                     softmax(Q K^T) V
    output projection     2 n q h
    MLP                   2 n h f x 3 with SwiGLU (gate, up, down), x 2 otherwise
    output layer          2 n h V                            (logits, once per model)

Causal attention is counted as Megatron counts it: half of the n x n score matrix (the `x 1/2` above), i.e.
the work a causal flash / memory-efficient kernel actually does, 2 n^2 q per layer for both products.
Training multiplies every term by 3: the forward, the input gradient and the weight gradient each cost one
forward (for Q K^T and P V the two backward products are dQ, dK and dP, dV: again 2x forward).

Recompute (hardware FLOPs, not model FLOPs): full recompute runs the forward of every recomputed layer once
more (`--recompute-method uniform`: all layers; `block`: the first `--recompute-num-layers` layers of each
pipeline chunk); selective recompute runs the attention-core forward (scores + context) once more. MFU
uses model FLOPs (no recompute), as PaLM defines it and as Megatron's TFLOP/s/GPU does.

CoCoMix terms (`cocomix_flops_per_sequence`), with s tokens, the mixing layer at the input of block L,
C concepts, k kept concept logits, and the layout of docs/design.md §4:
    layers_at_2x = num_layers - L  blocks run on 2s positions (interleave mixing or pause tokens): their
                   token-linear cost doubles and their attention core (2s)^2 costs 4x.
    concept head   predictor d -> C:           2 s h C            (x3 in training)
    compression    sparse C -> d, k columns:   2 s k h            (x3: dvalues and dcolumns in backward)
    logits         read from the s concept slots: unchanged.
Teacher (online labels; weights frozen, so no weight gradients), a transformer of its own shape:
    forward        all teacher layers + its output layer on s tokens
    partial bwd    input gradients only, from the loss down to the hook hidden_states[l]: the token-linear
                   terms of layers l..L_t-1 and the output layer once, their attention cores twice (dQ, dK
                   and dP, dV both depend on the activations)
    SAE encode     2 s d_t C   (dense encoder)
    attribution    2 s k_sae d_t   (gradient . the k active decoder columns)
KD baseline: the teacher forward only.
The terms read args.cocomix, args.concept_layer, args.concept_dim, args.concept_topk, args.concept_mixing,
args.no_concept_loss, args.pause_tokens, args.concept_labels, args.teacher_layer and args.kd; the teacher's
shape comes from `TransformerShape.from_pretrained_path(--teacher-model)` or is passed in, and the SAE's k
defaults to --concept-topk. `extra_flops_per_token` gives the CoCoMix / teacher cost beyond the NTP model.

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
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

# Gated MLPs (gate + up + down projections) among Hugging Face model types a teacher is likely to be.
_GATED_MLP_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3",
                          "olmo", "olmo2", "granite", "cohere", "stablelm", "smollm3"}


@dataclass(frozen=True)
class TransformerShape:
    """The sizes that determine a decoder-only transformer's FLOPs."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    gated_mlp: bool = False

    @property
    def query_size(self) -> int:
        return self.kv_channels * self.num_attention_heads

    @property
    def kv_size(self) -> int:
        return self.kv_channels * self.num_query_groups

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TransformerShape":
        vocab = getattr(args, "padded_vocab_size", None) or args.vocab_size
        if vocab is None:
            raise ValueError("FLOPs estimate: the vocabulary size is unknown (build the tokenizer first, or give "
                             "--vocab-size)")
        heads = args.num_attention_heads
        groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
        return cls(num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                   num_attention_heads=heads, num_query_groups=groups or heads,
                   kv_channels=args.kv_channels or args.hidden_size // heads, vocab_size=vocab,
                   gated_mlp=bool(args.swiglu))

    @classmethod
    def from_hf_config(cls, config) -> "TransformerShape":
        """From a Hugging Face config object or dict (GPT-2 names n_layer/n_embd/... or Llama-style names)."""
        get = (lambda key, default=None: config.get(key, default)) if isinstance(config, dict) else \
            (lambda key, default=None: getattr(config, key, default))
        layers = get("num_hidden_layers") or get("n_layer")
        hidden = get("hidden_size") or get("n_embd")
        heads = get("num_attention_heads") or get("n_head")
        if not (layers and hidden and heads):
            raise ValueError(f"teacher config of type {get('model_type')!r} has no layer count / width / heads")
        ffn = get("intermediate_size") or get("n_inner") or 4 * hidden
        model_type = get("model_type", "") or ""
        return cls(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                   num_query_groups=get("num_key_value_heads") or heads,
                   kv_channels=get("head_dim") or hidden // heads, vocab_size=get("vocab_size"),
                   gated_mlp=model_type in _GATED_MLP_MODEL_TYPES)

    @classmethod
    def from_pretrained_path(cls, path: str) -> "TransformerShape":
        """From a local Hugging Face model directory (config.json) or a .gguf file (its metadata)."""
        if os.path.isdir(path):
            config_path = os.path.join(path, "config.json")
            if not os.path.isfile(config_path):
                raise FileNotFoundError(f"teacher model {path}: no config.json")
            with open(config_path) as f:
                return cls.from_hf_config(json.load(f))
        if os.path.isfile(path) and path.endswith(".gguf"):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path),
                                                local_files_only=True)
            return cls.from_hf_config(config)
        raise FileNotFoundError(f"teacher model {path}: expected a Hugging Face model directory or a .gguf file")


# ---------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------

def layer_linear_flops(shape: TransformerShape, num_tokens: int) -> float:
    """Forward FLOPs of one layer's weight matmuls (QKV, projection, MLP) on `num_tokens` positions."""
    h, q, kv, f = shape.hidden_size, shape.query_size, shape.kv_size, shape.ffn_hidden_size
    mlp_matrices = 3 if shape.gated_mlp else 2
    return 2.0 * num_tokens * (h * (q + 2 * kv) + q * h + mlp_matrices * h * f)


def layer_attention_core_flops(shape: TransformerShape, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs of Q K^T and softmax(.) V for one sequence; causal attention counts half (as Megatron)."""
    full = 2 * (2.0 * seq_len * seq_len * shape.query_size)
    return full / 2 if causal else full


def output_layer_flops(shape: TransformerShape, num_tokens: int) -> float:
    return 2.0 * num_tokens * shape.hidden_size * shape.vocab_size


def _layer_positions(args: argparse.Namespace) -> List[int]:
    """Positions each student layer runs on per sequence: 2s above the CoCoMix / pause interleaving layer."""
    s = args.seq_length
    positions = [s] * args.num_layers
    start = layers_at_2x_start(args)
    if start is not None:
        for i in range(start, args.num_layers):
            positions[i] = 2 * s
    return positions


def layers_at_2x_start(args: argparse.Namespace) -> Optional[int]:
    """Index of the first block that runs on 2s positions, or None when nothing is interleaved."""
    concept_layer = getattr(args, "concept_layer", None)
    if concept_layer is None:
        return None
    interleaved = (getattr(args, "cocomix", False) and getattr(args, "concept_mixing", "interleave") == "interleave")
    if interleaved or getattr(args, "pause_tokens", False):
        return concept_layer
    return None


def layers_at_2x(args: argparse.Namespace) -> int:
    """Number of blocks that run on 2s positions (CoCoMix interleaving or pause tokens)."""
    start = layers_at_2x_start(args)
    return 0 if start is None else args.num_layers - start


def _recomputed_layers(args: argparse.Namespace) -> List[int]:
    """Global indices of the layers whose forward runs twice under full recompute."""
    if getattr(args, "recompute_granularity", None) != "full":
        return []
    if getattr(args, "recompute_method", "uniform") != "block":
        return list(range(args.num_layers))
    chunks = args.pipeline_model_parallel_size * (getattr(args, "virtual_pipeline_model_parallel_size", None) or 1)
    per_chunk = args.num_layers // chunks
    n = min(args.recompute_num_layers or 0, per_chunk)
    return [c * per_chunk + i for c in range(chunks) for i in range(n)]


def cocomix_flops_per_sequence(args: argparse.Namespace) -> Dict[str, float]:
    """Training FLOPs (x3) of the concept head and compression for one sequence; {} without --cocomix.
    The 2s layers are not here: `flops_per_sequence` runs those layers at their positions."""
    if not getattr(args, "cocomix", False):
        return {}
    s, h = args.seq_length, args.hidden_size
    concepts = getattr(args, "concept_dim", None)
    if not concepts:
        raise ValueError("FLOPs estimate: --cocomix needs the number of concepts (--concept-dim, or --sae)")
    mixing = getattr(args, "concept_mixing", "interleave")
    terms = {}
    if mixing != "none" or not getattr(args, "no_concept_loss", False):
        terms["concept predictor"] = 3 * 2.0 * s * h * concepts
    if mixing != "none":
        terms["concept compression"] = 3 * 2.0 * s * args.concept_topk * h
    return terms


def teacher_flops_per_sequence(args: argparse.Namespace, teacher: Optional[TransformerShape],
                               sae_topk: Optional[int] = None) -> Dict[str, float]:
    """FLOPs of the frozen teacher per student sequence (online CoCoMix labels or the KD baseline)."""
    online = getattr(args, "cocomix", False) and getattr(args, "concept_labels", "online") == "online"
    kd = getattr(args, "kd", False)
    if teacher is None or not (online or kd):
        return {}
    s = args.seq_length
    layers = teacher.num_layers
    forward = layers * (layer_linear_flops(teacher, s) + layer_attention_core_flops(teacher, s))
    forward += output_layer_flops(teacher, s)
    terms = {"teacher forward": forward}
    if online:
        hook = getattr(args, "teacher_layer", None)
        hook = layers if hook is None else hook
        above = layers - hook
        terms["teacher partial backward"] = (above * (layer_linear_flops(teacher, s)
                                                      + 2 * layer_attention_core_flops(teacher, s))
                                             + output_layer_flops(teacher, s))
        concepts = getattr(args, "concept_dim", None) or 0
        k = sae_topk if sae_topk is not None else args.concept_topk
        terms["SAE encode"] = 2.0 * s * teacher.hidden_size * concepts
        terms["attribution"] = 2.0 * s * k * teacher.hidden_size
    return terms


def flops_per_sequence(args: argparse.Namespace, teacher: Optional[TransformerShape] = None,
                       sae_topk: Optional[int] = None) -> Dict[str, float]:
    """Training FLOPs of one sequence, by term (forward + backward; 'recompute' is the extra forward)."""
    shape = TransformerShape.from_args(args)
    positions = _layer_positions(args)
    terms = {
        "attention projections": 3 * sum(2.0 * n * shape.hidden_size * (shape.query_size + 2 * shape.kv_size)
                                          + 2.0 * n * shape.query_size * shape.hidden_size for n in positions),
        "attention core": 3 * sum(layer_attention_core_flops(shape, n) for n in positions),
        "mlp": 3 * sum(2.0 * n * (3 if shape.gated_mlp else 2) * shape.hidden_size * shape.ffn_hidden_size
                       for n in positions),
        "output layer": 3 * output_layer_flops(shape, args.seq_length),
    }
    terms.update(cocomix_flops_per_sequence(args))
    terms.update(teacher_flops_per_sequence(args, teacher, sae_topk))
    recompute = sum(layer_linear_flops(shape, positions[i]) + layer_attention_core_flops(shape, positions[i])
                    for i in _recomputed_layers(args))
    if getattr(args, "recompute_granularity", None) == "selective":
        recompute = sum(layer_attention_core_flops(shape, n) for n in positions)
    terms["recompute"] = recompute
    return terms


def extra_flops_per_token(args: argparse.Namespace, teacher: Optional[TransformerShape] = None,
                          sae_topk: Optional[int] = None) -> float:
    """CoCoMix / teacher FLOPs per student token beyond the plain NTP model of the same shape (model FLOPs)."""
    with_extras = flops_per_sequence(args, teacher, sae_topk)
    plain = argparse.Namespace(**vars(args))
    plain.cocomix, plain.pause_tokens, plain.kd = False, False, False
    without = flops_per_sequence(plain)
    extra = sum(v for k, v in with_extras.items() if k != "recompute") - \
        sum(v for k, v in without.items() if k != "recompute")
    return extra / args.seq_length


def num_floating_point_operations(args: argparse.Namespace, batch_size: Optional[int] = None,
                                  teacher: Optional[TransformerShape] = None, sae_topk: Optional[int] = None,
                                  include_recompute: bool = False) -> float:
    """FLOPs of one iteration (a global batch). Model FLOPs by default; `include_recompute` gives hardware FLOPs."""
    batch_size = args.global_batch_size if batch_size is None else batch_size
    terms = flops_per_sequence(args, teacher, sae_topk)
    if not include_recompute:
        terms.pop("recompute")
    return batch_size * sum(terms.values())


# ---------------------------------------------------------------------------------------------------------
# Peak throughput
# ---------------------------------------------------------------------------------------------------------

# Dense (no sparsity) tensor-core peaks in TFLOP/s per device, by device-name substring, checked in order so
# that the more specific names come first. Columns: 16-bit (bf16 / fp16) and fp32 (no TF32).
PEAK_TFLOPS = [
    ("GB200", 2500.0, 80.0), ("B200", 2250.0, 80.0), ("B100", 1750.0, 60.0),
    ("H100 PCIe", 756.0, 51.0), ("H100 NVL", 835.0, 60.0), ("GH200", 989.0, 67.0),
    ("H200", 989.0, 67.0), ("H100", 989.0, 67.0), ("H800", 989.0, 67.0), ("H20", 148.0, 44.0),
    ("A100", 312.0, 19.5), ("A800", 312.0, 19.5), ("A30", 165.0, 10.3), ("A10G", 70.0, 31.2), ("A10", 125.0, 31.2),
    ("L40S", 362.0, 91.6), ("L40", 181.0, 90.5), ("L4", 121.0, 30.3),
    ("RTX 6000 Ada", 364.0, 91.1), ("A6000", 155.0, 38.7), ("V100", 125.0, 15.7), ("T4", 65.0, 8.1),
    ("MI300X", 1307.0, 163.4), ("MI250X", 383.0, 47.9),
]


def peak_tflops(device_name: str, sixteen_bit: bool) -> Optional[float]:
    """Peak dense TFLOP/s of a device from its name, or None when it is not in the table."""
    for key, half, single in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return half if sixteen_bit else single
    return None


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
    bias = 0 if getattr(args, "disable_bias_linear", False) else 1
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
    if getattr(args, "cocomix", False) and getattr(args, "concept_layer", None) is not None:
        concepts = getattr(args, "concept_dim", None) or 0
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
    if not getattr(args, "deepspeed", False):
        return None
    config = getattr(args, "deepspeed_config_dict", None) or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def layer_activation_bytes(args: argparse.Namespace, num_tokens: int) -> float:
    """Activation bytes one layer keeps for backward, per micro-batch per TP rank (no recompute)."""
    shape = TransformerShape.from_args(args)
    t = args.tensor_model_parallel_size
    sp = t if getattr(args, "sequence_parallel", False) else 1
    e = 2 if (args.bf16 or args.fp16) else 4
    n, b, h = num_tokens, args.micro_batch_size, args.hidden_size
    q, kv, f, a = shape.query_size, shape.kv_size, shape.ffn_hidden_size, shape.num_attention_heads
    masks = 2 if args.hidden_dropout > 0 else 0
    sequence_part = (4 * e + masks) * n * b * h / sp
    mlp_activation = f * (2 if shape.gated_mlp else 1)
    tensor_part = e * n * b * (2 * q + 2 * kv + mlp_activation + f) / t
    if getattr(args, "attention_backend", "sdpa") == "local":
        per_score = (2 * e + 1) if args.attention_dropout > 0 else e
        if getattr(args, "recompute_granularity", None) == "selective":
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
    vp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
    sixteen = args.bf16 or args.fp16
    e = 2 if sixteen else 4
    zero = _zero_stage(args)
    positions = _layer_positions(args)
    per_stage = args.num_layers // pp
    recomputed = set(_recomputed_layers(args))
    sp = t if getattr(args, "sequence_parallel", False) else 1
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
        elif getattr(args, "recompute_granularity", None) == "selective":
            notes.append("selective recompute")
        if stage == 0:
            stored += (1 if args.hidden_dropout > 0 else 0) * s * b * h / sp
        if stage == pp - 1:
            # Final norm and output-layer inputs, and the fp32 logits the vocab-parallel cross-entropy keeps.
            stored += 2 * e * s * b * h / sp + 4.0 * s * b * shape.vocab_size / t
        if getattr(args, "cocomix", False) and args.concept_layer is not None and \
                min(args.concept_layer // per_stage, pp - 1) == stage and getattr(args, "concept_dim", None):
            stored += e * s * b * h / sp + 4.0 * s * b * args.concept_dim / t
        in_flight = min(pp - stage, args.num_micro_batches)
        factor = in_flight * (1 + (pp - 1) / (pp * vp) if vp > 1 else 1)
        notes.append(f"{factor:g} micro-batches of activations in flight")
        estimates.append(MemoryEstimate(stage, weights, grads, optimizer, stored * factor, notes))
    return estimates


def format_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def startup_report(args: argparse.Namespace, actual_stage_params: Optional[Sequence[int]] = None,
                   teacher: Optional[TransformerShape] = None, sae_topk: Optional[int] = None,
                   teacher_note: Optional[str] = None) -> str:
    """The start-up summary: parameters, FLOPs per iteration by term, memory per device by stage."""
    counts = parameter_counts(args)
    lines = [" > model size and cost estimate:"]
    lines.append(f"   parameters (unique): {counts.unique_total} ({format_count(counts.unique_total)})")
    tp = args.tensor_model_parallel_size
    for stage in range(args.pipeline_model_parallel_size):
        line = (f"   parameters on pipeline stage {stage}: {counts.stage_total(stage)}, per tensor-parallel rank: "
                f"{counts.per_device(stage, tp):.0f}")
        if actual_stage_params is not None:
            line += f" (built model: {actual_stage_params[stage]})"
        lines.append(line)
    terms = flops_per_sequence(args, teacher, sae_topk)
    gbs = args.global_batch_size
    model = num_floating_point_operations(args, teacher=teacher, sae_topk=sae_topk)
    hardware = num_floating_point_operations(args, teacher=teacher, sae_topk=sae_topk, include_recompute=True)
    lines.append(f"   FLOPs per iteration: {model:.4e} model, {hardware:.4e} with recompute "
                 f"({model / (gbs * args.seq_length):.4e} per token; causal attention counted as half)")
    for name, value in terms.items():
        if value:
            lines.append(f"     {name}: {gbs * value:.4e} ({100 * value / max(sum(terms.values()), 1):.1f}%)")
    if teacher_note:
        lines.append(f"     {teacher_note}")
    mib = 1024.0 ** 2
    for est in memory_estimate(args):
        lines.append(f"   memory estimate per device, stage {est.stage} (MB): weights {est.weights / mib:.1f} | "
                     f"grads {est.grads / mib:.1f} | optimizer {est.optimizer / mib:.1f} | "
                     f"activations {est.activations / mib:.1f} | total {est.total / mib:.1f} "
                     f"({'; '.join(est.notes)})")
    return "\n".join(lines)
