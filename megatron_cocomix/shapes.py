"""The sizes of a decoder-only transformer, from this project's flags or from a Hugging Face config.

Used for the student (FLOPs, parameter and memory estimates) and for a teacher LM (its shape is read once at
start-up from config.json or .gguf metadata, without loading weights; concepts/teacher.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

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
        vocab = args.padded_vocab_size or args.vocab_size
        if vocab is None:
            raise ValueError("FLOPs estimate: the vocabulary size is unknown (build the tokenizer first, or give "
                             "--vocab-size)")
        heads = args.num_attention_heads
        groups = args.num_query_groups if args.group_query_attention else heads
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
