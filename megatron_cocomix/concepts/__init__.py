"""Concept teacher for CoCoMix: a frozen teacher LM, a TopK SAE on one of its layers, and attribution labels.

    from megatron_cocomix.concepts import load_sae, load_teacher, attribution_labels
    teacher = load_teacher("path/to/hf_model_or.gguf", layer=6)
    sae = load_sae("path/to/sae").to(teacher.device).freeze()
    labels = attribution_labels(teacher, sae, tokens, num_labels=4)      # [b, t, 4] latent ids, -1 = none
"""

from .attribution import ATTRIBUTION_MODES, attribution_labels, check_teacher_sae, sparse_attribution_scores
from .sae import (
    SAEShape,
    SparseCode,
    TopKSAE,
    check_sae_compatible,
    layer_norm_stats,
    load_sae,
    read_sae_shape,
    sae_fingerprint,
    save_saelens,
)
from .teacher import Teacher, check_teacher_tokenizer, load_teacher, load_teacher_tokenizer, read_teacher_shape

__all__ = [
    "ATTRIBUTION_MODES", "SAEShape", "SparseCode", "Teacher", "TopKSAE", "attribution_labels",
    "check_sae_compatible", "check_teacher_sae", "check_teacher_tokenizer", "layer_norm_stats", "load_sae",
    "load_teacher", "load_teacher_tokenizer", "read_sae_shape", "read_teacher_shape", "sae_fingerprint",
    "save_saelens", "sparse_attribution_scores",
]
