"""Tiny random teachers and SAEs for the concept tests (built from configs, saved to temporary directories)."""

from __future__ import annotations

import os

import torch


def save_tiny_gpt2(path: str, vocab_size: int = 96, seed: int = 0) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def save_tiny_llama(path: str, vocab_size: int = 96, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def random_sae_tensors(d: int, c: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """OpenAI-named random SAE tensors with non-trivial biases."""
    g = torch.Generator().manual_seed(seed)
    return {
        "pre_bias": torch.randn(d, generator=g) * 0.3,
        "encoder.weight": torch.randn(c, d, generator=g) / d ** 0.5,
        "latent_bias": torch.randn(c, generator=g) * 0.1,
        "decoder.weight": torch.randn(d, c, generator=g) / d ** 0.5,
    }


def write_openai_sae(path: str, d: int, c: int, k: int, seed: int = 0) -> dict:
    tensors = random_sae_tensors(d, c, seed)
    state = dict(tensors, activation="TopK", activation_state_dict={"k": k, "postact_fn": "ReLU"})
    torch.save(state, path)
    return tensors


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_token_dataset(prefix: str, vocab_size: int, num_docs: int = 20, seed: int = 0, min_len: int = 20,
                        max_len: int = 120) -> list:
    """A megatron .bin/.idx of random token documents; returns the documents."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    g = torch.Generator().manual_seed(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    docs = []
    for _ in range(num_docs):
        n = int(torch.randint(min_len, max_len, (1,), generator=g))
        doc = torch.randint(0, vocab_size, (n,), generator=g, dtype=torch.int32)
        builder.add_item(doc)
        builder.end_document()
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    return docs
