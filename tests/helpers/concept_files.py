"""Tiny random teachers (GPT-2, Llama; HF folders) and OpenAI-format SAEs for the concept tests, built from configs
and written where the test asks."""

from __future__ import annotations

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
