"""Import a Hugging Face causal LM (GPT2LMHeadModel, Llama family, a directory or a .gguf file) into a training
checkpoint that `pretrain_cocomix.py --load DIR --finetune` continues from.

The model's shape becomes Megatron flags (`flags_for`), its weights the megatron names (the inverse of
weights.py's maps: Conv1D transposed back, q / k / v fused per query group, gate / up fused into fc1), with the
vocabulary padded by zero rows to what the training run at the requested tensor-parallel size pads it to. The
checkpoint is written by this one process at TP1 in the dist_checkpointing format, which reshards on load, so the
run may use any TP / PP; its common state records the flags and the tokenizer as training checkpoints do.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, List, Tuple

import torch

from megatron_cocomix.conversion.weights import fuse_qkv

Tensors = Dict[str, torch.Tensor]


def _is_cocomix(path: str) -> bool:
    """A CoCoMix directory: this project's export, or the official release (a GPT-2 config with concept_dim)."""
    import json

    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return "concept_dim" in json.load(f)


def load_hf(path: str):
    """(model in fp32, tokenizer) from a local directory or a .gguf file (dequantised), offline."""
    from megatron_cocomix.concepts.teacher import check_model_path, load_hf_model, load_teacher_tokenizer

    check_model_path(path)
    if _is_cocomix(path):
        # This project's class reads both (same names); AutoModel would read the official one as plain GPT-2.
        from megatron_cocomix.hf import CoCoMixForCausalLM

        model = CoCoMixForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        return model.eval(), load_teacher_tokenizer(path)
    return load_hf_model(path, torch.float32).eval(), load_teacher_tokenizer(path)


def concept_flags(config) -> List[str]:
    """The training flags of a CoCoMix / pause-token model beyond its network flags."""
    if getattr(config, "mixing", "concept") == "pause":
        return ["--pause-tokens", "--concept-layer", str(config.insert_layer_idx)]
    return ["--cocomix", "--concept-layer", str(config.insert_layer_idx), "--concept-dim", str(config.concept_dim),
            "--concept-topk", str(config.concept_num)]


def flags_for(config, seq_length: int) -> Tuple[str, List[str]]:
    """('gpt2' | 'llama', the Megatron network flags of this config); ValueError for anything else."""
    model_type = config.model_type
    tied = bool(getattr(config, "tie_word_embeddings", True))
    cocomix = getattr(config, "concept_dim", None) is not None
    if model_type == "gpt2" or cocomix:
        if config.activation_function not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function {config.activation_function}: only GELU (exact or tanh) imports")
        if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn or not config.scale_attn_weights:
            raise ValueError("GPT-2 attention scaling options other than the default do not import")
        flags = ["--num-layers", config.n_layer, "--hidden-size", config.n_embd, "--num-attention-heads", config.n_head,
                 "--ffn-hidden-size", config.n_inner or 4 * config.n_embd,
                 "--max-position-embeddings", config.n_positions, "--norm-epsilon", config.layer_norm_epsilon]
        if config.activation_function != "gelu":
            flags.append("--openai-gelu")
        arch = "cocomix" if cocomix else "gpt2"
        if getattr(config, "position_embedding_type", "learned_absolute") == "rope":
            flags += ["--position-embedding-type", "rope", "--rotary-base", int(config.rotary_base)]
        else:
            seq_length = min(seq_length, config.n_positions)
    elif model_type in ("llama", "mistral", "qwen2") or getattr(config, "hidden_act", None) == "silu":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if head_dim * config.num_attention_heads != config.hidden_size:
            raise ValueError(f"head_dim {head_dim}: imports need head_dim x heads = hidden size")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type {rope.get('rope_type')}: only default (unscaled) RoPE imports")
        bias = bool(getattr(config, "attention_bias", False))
        if bias != bool(getattr(config, "mlp_bias", False)):
            raise ValueError("attention_bias != mlp_bias: Megatron has one --disable-bias-linear for both")
        flags = ["--num-layers", config.num_hidden_layers, "--hidden-size", config.hidden_size,
                 "--num-attention-heads", config.num_attention_heads, "--ffn-hidden-size", config.intermediate_size,
                 "--group-query-attention", "--num-query-groups", config.num_key_value_heads,
                 "--max-position-embeddings", config.max_position_embeddings,
                 "--position-embedding-type", "rope", "--rotary-base", int(theta), "--normalization", "RMSNorm",
                 "--norm-epsilon", config.rms_norm_eps, "--swiglu"]
        if not bias:
            flags.append("--disable-bias-linear")
        arch = "llama"
        seq_length = min(seq_length, config.max_position_embeddings)
    else:
        raise ValueError(f"model_type {model_type}: only GPT-2 and Llama-family models import")
    if not tied:
        flags.append("--untie-embeddings-and-output-weights")
    flags += ["--seq-length", seq_length]
    return arch, [str(f) for f in flags]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def hf_to_megatron(state: Tensors, args, arch: str) -> Tensors:
    """Megatron TP1 names from HF names; vocabulary rows padded with zeros to args.padded_vocab_size."""
    heads, groups, n = args.num_attention_heads, args.num_query_groups, args.num_layers
    out = {}
    if arch in ("gpt2", "cocomix"):
        d = args.hidden_size
        out["embedding.word_embeddings.weight"] = state["transformer.wte.weight"]
        if "transformer.wpe.weight" in state:
            out["embedding.position_embeddings.weight"] = state["transformer.wpe.weight"]
        for i in range(n):
            src, dst = f"transformer.h.{i}.", f"decoder.layers.{i}."
            q, k, v = state[src + "attn.c_attn.weight"].T.split(d)
            out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, heads, heads)
            out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(*state[src + "attn.c_attn.bias"].split(d),
                                                                   heads, heads)
            out[dst + "self_attention.linear_proj.weight"] = state[src + "attn.c_proj.weight"].T
            out[dst + "self_attention.linear_proj.bias"] = state[src + "attn.c_proj.bias"]
            out[dst + "mlp.linear_fc1.weight"] = state[src + "mlp.c_fc.weight"].T
            out[dst + "mlp.linear_fc1.bias"] = state[src + "mlp.c_fc.bias"]
            out[dst + "mlp.linear_fc2.weight"] = state[src + "mlp.c_proj.weight"].T
            out[dst + "mlp.linear_fc2.bias"] = state[src + "mlp.c_proj.bias"]
            for ln, name in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
                out[f"{dst}{name}.weight"] = state[f"{src}{ln}.weight"]
                out[f"{dst}{name}.bias"] = state[f"{src}{ln}.bias"]
        out["decoder.final_layernorm.weight"] = state["transformer.ln_f.weight"]
        out["decoder.final_layernorm.bias"] = state["transformer.ln_f.bias"]
        mix = f"decoder.layers.{args.concept_layer}.concept_mixing."
        if arch == "cocomix" and args.pause_tokens:
            out[mix + "pause_embedding"] = state["transformer.pause_embedding"]
        elif arch == "cocomix":
            out[mix + "predictor.pre_bias"] = state["transformer.pre_bias"]
            out[mix + "predictor.linear.weight"] = state["transformer.concept_predictor.weight"]
            out[mix + "predictor.linear.bias"] = state["transformer.concept_predictor.bias"]
            out[mix + "compress_weight"] = state["transformer.compress_layer.weight"].T
            out[mix + "compress_bias"] = state["transformer.compress_layer.bias"]
    else:
        out["embedding.word_embeddings.weight"] = state["model.embed_tokens.weight"]
        for i in range(n):
            src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
            attn = [state[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"]
            out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(*attn, heads, groups)
            out[dst + "self_attention.linear_proj.weight"] = state[src + "self_attn.o_proj.weight"]
            out[dst + "mlp.linear_fc1.weight"] = torch.cat([state[src + "mlp.gate_proj.weight"],
                                                            state[src + "mlp.up_proj.weight"]])
            out[dst + "mlp.linear_fc2.weight"] = state[src + "mlp.down_proj.weight"]
            if not args.disable_bias_linear:
                out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(
                    *[state[f"{src}self_attn.{p}_proj.bias"] for p in "qkv"], heads, groups)
                out[dst + "self_attention.linear_proj.bias"] = state[src + "self_attn.o_proj.bias"]
                out[dst + "mlp.linear_fc1.bias"] = torch.cat([state[src + "mlp.gate_proj.bias"],
                                                              state[src + "mlp.up_proj.bias"]])
                out[dst + "mlp.linear_fc2.bias"] = state[src + "mlp.down_proj.bias"]
            out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
            out[dst + "pre_mlp_layernorm.weight"] = state[src + "post_attention_layernorm.weight"]
        out["decoder.final_layernorm.weight"] = state["model.norm.weight"]
    padded = args.padded_vocab_size
    out["embedding.word_embeddings.weight"] = _pad_rows(out["embedding.word_embeddings.weight"], padded)
    if args.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = _pad_rows(state["lm_head.weight"], padded)
    return {name: t.contiguous() for name, t in out.items()}


def save_checkpoint_tp1(model: torch.nn.Module, args, output: str) -> None:
    """Write `model` as iteration 0 of a training checkpoint under `output` (atomically: temp dir + rename)."""
    from megatron.core import dist_checkpointing

    from megatron_cocomix.distributed import current_layout
    from megatron_cocomix.training.checkpointing import (
        CHECKPOINT_VERSION,
        TRACKER,
        InProcessTorchDistSave,
        checkpoint_dir,
        export_state,
        model_shape_args,
    )

    os.makedirs(output, exist_ok=True)
    final = checkpoint_dir(output, 0)
    tmp = f"{final}.tmp-import"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {"model": model.sharded_state_dict(), "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
             "consumed_train_samples": 0, "model_args": model_shape_args(args), "export": export_state(args),
             "layout": current_layout(), "optimizer_backend": None}
    dist_checkpointing.save(state, tmp, sharded_strategy=InProcessTorchDistSave())
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    with open(os.path.join(output, TRACKER), "w") as f:
        f.write("0")
