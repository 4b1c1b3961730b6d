"""Configuration of the exported CoCoMix / pause-token model (torch + transformers only; copied into every export).

A valid GPT2Config (n_embd, n_layer, n_head, n_inner, n_positions, activation_function, layer_norm_epsilon,
vocab_size, tie_word_embeddings, ...) plus the official GPT2CoCoMixLMHeadModel's constructor arguments:

    concept_dim        C, number of concepts (SAE latents): concept_predictor d -> C, compress_layer C -> d
    insert_layer_idx   L, the concept layer sits at the input of block L; blocks >= L see 2 slots per token
    concept_num        k, predicted concept logits kept per token (top-k) and compressed

and this project's own keys: position_embedding_type ("learned_absolute": a learned table added once to the
tokens; "rope": rotary, a concept slot takes its token's position), rotary_base, and mixing ("concept", or
"pause": one learned vector interleaved instead of the concept, the pause-token baseline).
"""

from transformers import GPT2Config


class CoCoMixConfig(GPT2Config):
    model_type = "cocomix"

    def __init__(self, concept_dim: int = 32768, insert_layer_idx: int = 5, concept_num: int = 32,
                 position_embedding_type: str = "learned_absolute", rotary_base: float = 10000.0,
                 mixing: str = "concept", **kwargs):
        if position_embedding_type not in ("learned_absolute", "rope"):
            raise ValueError(f"position_embedding_type {position_embedding_type!r}: expected learned_absolute or rope")
        if mixing not in ("concept", "pause"):
            raise ValueError(f"mixing {mixing!r}: expected concept or pause")
        self.concept_dim = concept_dim
        self.insert_layer_idx = insert_layer_idx
        self.concept_num = concept_num
        self.position_embedding_type = position_embedding_type
        self.rotary_base = rotary_base
        self.mixing = mixing
        super().__init__(**kwargs)
