"""Tiny CoCoMix assets for the tests: a random GPT-2 teacher and a random TopK SAE on its hidden size.

Both are built from configs (nothing is downloaded) into a directory under the system temp dir keyed by their
shape, so one pytest session (and the torchrun children it launches) builds each at most once. The teacher's
vocabulary is 256, the vocabulary of tests/helpers/launch.py's TINY_GPT (255 tokens + EOD, NullTokenizer), so the
teacher reads the student's token ids as they are.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, List

import torch

from tests.helpers.paths import GPT2_MERGES
from tests.helpers.paths import GPT2_VOCAB as GPT2_VOCAB_FILE

TEACHER_VOCAB = 256
GPT2_VOCAB = 50257
TEACHER_WIDTH = 32
TEACHER_LAYER = 1
SAE_LATENTS = 64
SAE_K = 8


def _cache_dir(name: str) -> str:
    root = os.path.join(tempfile.gettempdir(), f"cocomix_test_assets_{os.getuid()}")
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, name)


def _publish(build, target: str) -> str:
    """Build into a private temp dir, then rename: concurrent builders never see a half-written asset."""
    if os.path.exists(target):
        return target
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".build_")
    build(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process published first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_teacher(vocab_size: int = TEACHER_VOCAB, width: int = TEACHER_WIDTH, layers: int = 2,
                 seed: int = 0, positions: int = 64) -> str:
    """A random GPT-2 (HF folder) with the given vocabulary; returns its path."""
    def build(path: str) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=width, n_layer=layers, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
        GPT2LMHeadModel(config).save_pretrained(path)
        if vocab_size == GPT2_VOCAB:
            # A teacher on the GPT-2 vocabulary tokenises like the student's GPT-2 data (training checks it).
            from transformers import GPT2TokenizerFast

            GPT2TokenizerFast(vocab=GPT2_VOCAB_FILE, merges=GPT2_MERGES).save_pretrained(path)

    suffix = "_tok" if vocab_size == GPT2_VOCAB else ""
    return _publish(build, _cache_dir(f"gpt2_v{vocab_size}_d{width}_l{layers}_p{positions}_s{seed}{suffix}"))


def tiny_sae(d_model: int = TEACHER_WIDTH, num_latents: int = SAE_LATENTS, k: int = SAE_K, seed: int = 0) -> str:
    """A random TopK SAE (SAELens folder) with non-zero biases; returns its path."""
    def build(path: str) -> None:
        from megatron_cocomix.concepts.sae import TopKSAE, save_saelens

        torch.manual_seed(seed)
        sae = TopKSAE(d_model=d_model, num_latents=num_latents, k=k)
        with torch.no_grad():
            sae.latent_bias.normal_(0, 0.1)
            sae.pre_bias.normal_(0, 0.3)
        save_saelens(sae, path)

    return _publish(build, _cache_dir(f"sae_d{d_model}_c{num_latents}_k{k}_s{seed}"))


def cocomix_flags(concept_layer: int = 2, topk: int = 4, teacher_layer: int = TEACHER_LAYER) -> List[str]:
    """Flags that turn TINY_GPT into a CoCoMix student with online labels from the tiny teacher + SAE."""
    return ["--cocomix", "--concept-layer", str(concept_layer), "--concept-topk", str(topk),
            "--teacher-model", tiny_teacher(), "--teacher-layer", str(teacher_layer), "--sae", tiny_sae()]


def flag_dict(flags: List[str]) -> Dict[str, str]:
    out, key = {}, None
    for token in flags:
        if token.startswith("--"):
            key = token
            out[key] = None
        elif key is not None:
            out[key] = token
    return out
