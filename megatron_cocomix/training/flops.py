"""FLOPs, parameter counts and a memory estimate for the configured model and parallel layout.

FLOPs of one training iteration (the PaLM / Narayanan et al. count, as Megatron-LM's
`num_floating_point_operations`)
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
Everything is read from the resolved arguments: the CoCoMix flags, and the teacher's shape
(`args.teacher_shape`) and the SAE's k (`args.sae_topk`), both read once at start-up from their files.
`extra_flops_per_token` gives the CoCoMix / teacher cost beyond the NTP model.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional

from megatron_cocomix.shapes import TransformerShape


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


def layer_positions(args: argparse.Namespace) -> List[int]:
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
    if args.concept_layer is None:
        return None
    if (args.cocomix and args.concept_mixing == "interleave") or args.pause_tokens:
        return args.concept_layer
    return None


def layers_at_2x(args: argparse.Namespace) -> int:
    """Number of blocks that run on 2s positions (CoCoMix interleaving or pause tokens)."""
    start = layers_at_2x_start(args)
    return 0 if start is None else args.num_layers - start


def recomputed_layers(args: argparse.Namespace) -> List[int]:
    """Global indices of the layers whose forward runs twice under full recompute."""
    if args.recompute_granularity != "full":
        return []
    if args.recompute_method != "block":
        return list(range(args.num_layers))
    chunks = args.pipeline_model_parallel_size * (args.virtual_pipeline_model_parallel_size or 1)
    per_chunk = args.num_layers // chunks
    n = min(args.recompute_num_layers or 0, per_chunk)
    return [c * per_chunk + i for c in range(chunks) for i in range(n)]


def cocomix_flops_per_sequence(args: argparse.Namespace) -> Dict[str, float]:
    """Training FLOPs (x3) of the concept head and compression for one sequence; {} without --cocomix.
    The 2s layers are not here: `flops_per_sequence` runs those layers at their positions."""
    if not args.cocomix:
        return {}
    s, h = args.seq_length, args.hidden_size
    concepts = args.concept_dim
    if not concepts:
        raise ValueError("FLOPs estimate: --cocomix needs the number of concepts (--concept-dim, or --sae)")
    mixing = args.concept_mixing
    terms = {}
    if mixing != "none" or not args.no_concept_loss:
        terms["concept predictor"] = 3 * 2.0 * s * h * concepts
    if mixing != "none":
        terms["concept compression"] = 3 * 2.0 * s * args.concept_topk * h
    return terms


def teacher_flops_per_sequence(args: argparse.Namespace) -> Dict[str, float]:
    """FLOPs of the frozen teacher per student sequence (online CoCoMix labels or the KD baseline), from
    `args.teacher_shape` and `args.sae_topk`; {} when no teacher runs in the training step."""
    online = args.cocomix and args.concept_labels == "online"
    teacher = args.teacher_shape
    if teacher is None or not (online or args.kd):
        return {}
    s = args.seq_length
    layers = teacher.num_layers
    if args.kd and args.kd_teacher_states and not online:
        # Precomputed final states (data/teacher_states.py): the teacher's head is all that runs.
        return {"teacher forward": output_layer_flops(teacher, s)}
    forward = layers * (layer_linear_flops(teacher, s) + layer_attention_core_flops(teacher, s))
    forward += output_layer_flops(teacher, s)
    terms = {"teacher forward": forward}
    if online:
        hook = layers if args.teacher_layer is None else args.teacher_layer
        above = layers - hook
        terms["teacher partial backward"] = (above * (layer_linear_flops(teacher, s)
                                                      + 2 * layer_attention_core_flops(teacher, s))
                                             + output_layer_flops(teacher, s))
        if args.sae_topk is None:
            raise ValueError("FLOPs estimate: the SAE's k is unknown (give --sae)")
        terms["SAE encode"] = 2.0 * s * teacher.hidden_size * (args.concept_dim or 0)
        terms["attribution"] = 2.0 * s * args.sae_topk * teacher.hidden_size
    return terms


def flops_per_sequence(args: argparse.Namespace) -> Dict[str, float]:
    """Training FLOPs of one sequence, by term (forward + backward; 'recompute' is the extra forward)."""
    shape = TransformerShape.from_args(args)
    positions = layer_positions(args)
    terms = {
        "attention projections": 3 * sum(2.0 * n * shape.hidden_size * (shape.query_size + 2 * shape.kv_size)
                                          + 2.0 * n * shape.query_size * shape.hidden_size for n in positions),
        "attention core": 3 * sum(layer_attention_core_flops(shape, n) for n in positions),
        "mlp": 3 * sum(2.0 * n * (3 if shape.gated_mlp else 2) * shape.hidden_size * shape.ffn_hidden_size
                       for n in positions),
        "output layer": 3 * output_layer_flops(shape, args.seq_length),
    }
    terms.update(cocomix_flops_per_sequence(args))
    terms.update(teacher_flops_per_sequence(args))
    recompute = sum(layer_linear_flops(shape, positions[i]) + layer_attention_core_flops(shape, positions[i])
                    for i in recomputed_layers(args))
    if args.recompute_granularity == "selective":
        recompute = sum(layer_attention_core_flops(shape, n) for n in positions)
    terms["recompute"] = recompute
    return terms


def extra_flops_per_token(args: argparse.Namespace) -> float:
    """CoCoMix / teacher FLOPs per student token beyond the plain NTP model of the same shape (model FLOPs)."""
    with_extras = flops_per_sequence(args)
    plain = argparse.Namespace(**vars(args))
    plain.cocomix, plain.pause_tokens, plain.kd = False, False, False
    without = flops_per_sequence(plain)
    extra = sum(v for k, v in with_extras.items() if k != "recompute") - \
        sum(v for k, v in without.items() if k != "recompute")
    return extra / args.seq_length


def num_floating_point_operations(args: argparse.Namespace, batch_size: Optional[int] = None,
                                  include_recompute: bool = False) -> float:
    """FLOPs of one iteration (a global batch). Model FLOPs by default; `include_recompute` gives hardware FLOPs."""
    batch_size = args.global_batch_size if batch_size is None else batch_size
    terms = flops_per_sequence(args)
    if not include_recompute:
        terms.pop("recompute")
    return batch_size * sum(terms.values())
