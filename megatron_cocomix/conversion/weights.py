"""Weight maps between this project's megatron-core GPT (TP1 names) and Hugging Face architectures.

Megatron layouts (y = x W^T + b, W [out, in]):
    linear_qkv  [ng * (np/ng + 2) * hd, d]: per query group g, its np/ng query heads, then one key and one value
                head, each hd rows (np heads, ng groups, hd head size)
    linear_proj [d, np * hd]; linear_fc1 [f, d], or [2f, d] = [gate; up] with SwiGLU; linear_fc2 [d, f]
    compress_weight [C, d] (one row per concept)

Targets:
    GPT-2 / CoCoMix (Conv1D, y = x W + b, W [in, out]): c_attn [d, 3d] = [W_q; W_k; W_v]^T (heads in order),
        c_proj = linear_proj^T, c_fc = fc1^T, mlp.c_proj = fc2^T; compress_layer.weight [d, C] = compress_weight^T.
    Llama (nn.Linear, W [out, in]): q/k/v_proj split from linear_qkv, o_proj = linear_proj,
        gate_proj / up_proj = the halves of fc1, down_proj = fc2.

Which architecture a run maps to (`choose_architecture`): learned positions + LayerNorm + GELU -> GPT2LMHeadModel;
rotary + RMSNorm + SwiGLU -> LlamaForCausalLM; CoCoMix / pause tokens -> the CoCoMix class (GPT-2 blocks, learned
or rotary positions). Anything else is refused in one line naming the flag. The vocabulary is cut to the
tokenizer's size (Megatron's padding rows are dropped).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

Tensors = Dict[str, torch.Tensor]


def _not_gpt2_block(args) -> str:
    """The first flag that takes the model away from GPT-2's block (LayerNorm, GELU MLP, multi-head attention)."""
    for flag, bad in (("--swiglu", args.swiglu), ("--normalization RMSNorm", args.normalization != "LayerNorm"),
                      ("--group-query-attention", args.num_query_groups != args.num_attention_heads)):
        if bad:
            return flag
    return ""


def choose_architecture(args) -> str:
    """'gpt2', 'llama' or 'cocomix' for these flags; ValueError naming the flag that has no exact target."""
    if args.cocomix or args.pause_tokens:
        if args.cocomix and args.concept_mixing != "interleave":
            raise ValueError(f"--concept-mixing {args.concept_mixing}: only interleave exports (the CoCoMix class)")
        flag = _not_gpt2_block(args)
        if flag:
            raise ValueError(f"{flag}: the CoCoMix export has GPT-2 blocks (LayerNorm, GELU, multi-head attention)")
        _check_common(args)
        return "cocomix"
    if args.position_embedding_type == "learned_absolute":
        flag = _not_gpt2_block(args)
        if flag:
            raise ValueError(f"{flag} with learned positions has no stock Hugging Face architecture "
                             f"(GPT2LMHeadModel needs LayerNorm, GELU and multi-head attention)")
        _check_common(args)
        return "gpt2"
    for flag, bad in (("--normalization LayerNorm", args.normalization != "RMSNorm"),
                      ("--swiglu (not given)", not args.swiglu)):
        if bad:
            raise ValueError(f"{flag} with rotary positions has no stock Hugging Face architecture "
                             f"(LlamaForCausalLM needs RMSNorm and SwiGLU)")
    _check_common(args)
    return "llama"


def _check_common(args) -> None:
    if args.kv_channels is not None and args.kv_channels * args.num_attention_heads != args.hidden_size:
        raise ValueError(f"--kv-channels {args.kv_channels}: exports need kv-channels x heads = hidden size")
    if args.position_embedding_type == "rope" and args.rotary_percent != 1.0:
        raise ValueError(f"--rotary-percent {args.rotary_percent}: exports need rotary on every head dim (1.0)")


def split_qkv(fused: torch.Tensor, heads: int, groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused QKV weight [ng (np/ng + 2) hd, ...] or bias -> q [np hd, ...], k, v [ng hd, ...]."""
    per_group = heads // groups
    rest = fused.shape[1:]
    grouped = fused.reshape(groups, per_group + 2, -1, *rest)
    hd = grouped.shape[2]
    q = grouped[:, :per_group].reshape(heads * hd, *rest)
    k = grouped[:, per_group].reshape(groups * hd, *rest)
    v = grouped[:, per_group + 1].reshape(groups * hd, *rest)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """The inverse of split_qkv."""
    per_group = heads // groups
    rest = q.shape[1:]
    hd = q.shape[0] // heads
    qg = q.reshape(groups, per_group, hd, *rest)
    kg = k.reshape(groups, 1, hd, *rest)
    vg = v.reshape(groups, 1, hd, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def _layer(m: Tensors, i: int, name: str) -> torch.Tensor:
    return m[f"decoder.layers.{i}.{name}"]


def _bias(m: Tensors, i: int, name: str, size: int) -> torch.Tensor:
    """A linear layer's bias; zeros when the run had --disable-bias-linear (GPT-2 blocks always have one)."""
    key = f"decoder.layers.{i}.{name}"
    return m[key] if key in m else torch.zeros(size, dtype=m["embedding.word_embeddings.weight"].dtype)


def to_gpt2_blocks(m: Tensors, args, prefix: str = "transformer.") -> Tensors:
    """GPT-2-named tensors of the embeddings, blocks and final norm (GPT2LMHeadModel and the CoCoMix class)."""
    d, heads = args.hidden_size, args.num_attention_heads
    out = {prefix + "wte.weight": m["embedding.word_embeddings.weight"]}
    if "embedding.position_embeddings.weight" in m:
        out[prefix + "wpe.weight"] = m["embedding.position_embeddings.weight"]
    for i in range(args.num_layers):
        dst = f"{prefix}h.{i}."
        q, k, v = split_qkv(_layer(m, i, "self_attention.linear_qkv.weight"), heads, heads)
        out[dst + "attn.c_attn.weight"] = torch.cat([q, k, v]).T
        qkv_bias = _bias(m, i, "self_attention.linear_qkv.bias", 3 * d)
        out[dst + "attn.c_attn.bias"] = torch.cat(split_qkv(qkv_bias, heads, heads))
        out[dst + "attn.c_proj.weight"] = _layer(m, i, "self_attention.linear_proj.weight").T
        out[dst + "attn.c_proj.bias"] = _bias(m, i, "self_attention.linear_proj.bias", d)
        out[dst + "mlp.c_fc.weight"] = _layer(m, i, "mlp.linear_fc1.weight").T
        out[dst + "mlp.c_fc.bias"] = _bias(m, i, "mlp.linear_fc1.bias", args.ffn_hidden_size)
        out[dst + "mlp.c_proj.weight"] = _layer(m, i, "mlp.linear_fc2.weight").T
        out[dst + "mlp.c_proj.bias"] = _bias(m, i, "mlp.linear_fc2.bias", d)
        for src, ln in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out[f"{dst}{ln}.weight"] = _layer(m, i, f"{src}.weight")
            out[f"{dst}{ln}.bias"] = _layer(m, i, f"{src}.bias")
    out[prefix + "ln_f.weight"] = m["decoder.final_layernorm.weight"]
    out[prefix + "ln_f.bias"] = m["decoder.final_layernorm.bias"]
    return out


def to_cocomix(m: Tensors, args) -> Tensors:
    """The official GPT2CoCoMixLMHeadModel's names (plus transformer.pause_embedding for pause-token models)."""
    out = to_gpt2_blocks(m, args)
    mix = f"decoder.layers.{args.concept_layer}.concept_mixing."
    if args.pause_tokens:
        out["transformer.pause_embedding"] = m[mix + "pause_embedding"]
    else:
        out["transformer.pre_bias"] = m[mix + "predictor.pre_bias"]
        out["transformer.concept_predictor.weight"] = m[mix + "predictor.linear.weight"]
        out["transformer.concept_predictor.bias"] = m[mix + "predictor.linear.bias"]
        out["transformer.compress_layer.weight"] = m[mix + "compress_weight"].T
        out["transformer.compress_layer.bias"] = m[mix + "compress_bias"]
    return out


def to_llama(m: Tensors, args) -> Tensors:
    heads, groups, f = args.num_attention_heads, args.num_query_groups, args.ffn_hidden_size
    out = {"model.embed_tokens.weight": m["embedding.word_embeddings.weight"],
           "model.norm.weight": m["decoder.final_layernorm.weight"]}
    for i in range(args.num_layers):
        dst = f"model.layers.{i}."
        for proj, t in zip("qkv", split_qkv(_layer(m, i, "self_attention.linear_qkv.weight"), heads, groups)):
            out[f"{dst}self_attn.{proj}_proj.weight"] = t
        out[dst + "self_attn.o_proj.weight"] = _layer(m, i, "self_attention.linear_proj.weight")
        fc1 = _layer(m, i, "mlp.linear_fc1.weight")
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = fc1[:f], fc1[f:]
        out[dst + "mlp.down_proj.weight"] = _layer(m, i, "mlp.linear_fc2.weight")
        if not args.disable_bias_linear:
            qkv_bias = _layer(m, i, "self_attention.linear_qkv.bias")
            for proj, t in zip("qkv", split_qkv(qkv_bias, heads, groups)):
                out[f"{dst}self_attn.{proj}_proj.bias"] = t
            out[dst + "self_attn.o_proj.bias"] = _layer(m, i, "self_attention.linear_proj.bias")
            fc1_bias = _layer(m, i, "mlp.linear_fc1.bias")
            out[dst + "mlp.gate_proj.bias"], out[dst + "mlp.up_proj.bias"] = fc1_bias[:f], fc1_bias[f:]
            out[dst + "mlp.down_proj.bias"] = _layer(m, i, "mlp.linear_fc2.bias")
        out[dst + "input_layernorm.weight"] = _layer(m, i, "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = _layer(m, i, "pre_mlp_layernorm.weight")
    return out


def megatron_to_hf(model: torch.nn.Module, args, architecture: str, vocab_size: int) -> Tensors:
    """HF state dict (contiguous tensors, padded vocabulary rows dropped; lm_head only when untied)."""
    m = {name: p.detach().cpu() for name, p in model.named_parameters()}
    out = {"gpt2": lambda: to_gpt2_blocks(m, args), "cocomix": lambda: to_cocomix(m, args),
           "llama": lambda: to_llama(m, args)}[architecture]()
    embed = "model.embed_tokens.weight" if architecture == "llama" else "transformer.wte.weight"
    out[embed] = out[embed][:vocab_size]
    if args.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = m["output_layer.weight"][:vocab_size]
    return {name: t.contiguous().clone() for name, t in out.items()}


def hf_config(args, architecture: str, vocab_size: int, eos: int, dtype: torch.dtype):
    """The transformers config object for the export."""
    common = dict(vocab_size=vocab_size, tie_word_embeddings=not args.untie_embeddings_and_output_weights,
                  bos_token_id=eos, eos_token_id=eos, dtype=dtype)
    if architecture == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size,
                           num_hidden_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                           num_key_value_heads=args.num_query_groups, hidden_act="silu",
                           max_position_embeddings=args.max_position_embeddings, rms_norm_eps=args.norm_epsilon,
                           rope_theta=float(args.rotary_base), attention_bias=not args.disable_bias_linear,
                           mlp_bias=not args.disable_bias_linear, **common)
    gpt2 = dict(n_positions=args.max_position_embeddings, n_embd=args.hidden_size, n_layer=args.num_layers,
                n_head=args.num_attention_heads, n_inner=args.ffn_hidden_size,
                activation_function="gelu_new" if args.openai_gelu else "gelu",
                layer_norm_epsilon=args.norm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if architecture == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(**gpt2)
    from megatron_cocomix.hf.configuration_cocomix import CoCoMixConfig

    return CoCoMixConfig(concept_dim=args.concept_dim if args.cocomix else 0,
                         insert_layer_idx=args.concept_layer, concept_num=args.concept_topk if args.cocomix else 0,
                         position_embedding_type=args.position_embedding_type, rotary_base=float(args.rotary_base),
                         mixing="pause" if args.pause_tokens else "concept", **gpt2)
