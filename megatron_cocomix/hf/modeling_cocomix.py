"""The exported CoCoMix (and pause-token) causal LM: torch + transformers only, copied into every export directory.

Parameter names and layouts are those of the official GPT2CoCoMixLMHeadModel (GPT-2's Conv1D, y = x W + b with W
[in, out]): transformer.wte / wpe / h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj} / ln_f,
transformer.pre_bias [d], transformer.concept_predictor (d -> C), transformer.compress_layer (C -> d), lm_head.

Forward, for tokens x [b, t] (docs/design.md §4-§5 of megatron_cocomix):

    h = wte(x) (+ wpe(position))                       learned positions added once, to the tokens only
    h = block_i(h)                  i < L              one slot per token                         [b, t, d]
    xn, mu, std = LN(h)                                unbiased std, eps 1e-5 added to the std
    z   = concept_predictor(xn - pre_bias)             concept logits                             [b, t, C]
    v   = TopK_k(z) scattered into zeros               raw logits at the k largest, 0 elsewhere   [b, t, C]
    c^  = (compress_layer(v) + pre_bias) * std + mu    continuous concept                         [b, t, d]
    h   = [h_1, c^_1, h_2, c^_2, ...]                  two slots per token                        [b, 2t, d]
    h   = block_i(h)                    i >= L         causal over the 2t slots
    logits = lm_head(ln_f(h[:, 1::2]))                 next-token logits from the concept slots   [b, t, V]

With rotary positions both slots of token i rotate by token i's position. Pause-token models interleave one
learned vector `transformer.pause_embedding` [d] instead of c^.

KV cache (a transformers DynamicCache, so generate() works): blocks below L keep one entry per token, blocks from
L on two (token slot, concept slot). Positions come from the attention mask (left padding: position = number of
real tokens before, as GPT-2's generate does), so cached and uncached runs see the same positions.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.pytorch_utils import Conv1D

from .configuration_cocomix import CoCoMixConfig

LN_EPS = 1e-5  # the SAE layer norm's eps (on the std), as in the concept layer of training


def concept_layer_norm(h: torch.Tensor):
    """The SAE's layer norm without affine: (h - mu) / (std + eps), std unbiased. Returns (xn, mu, std)."""
    mu = h.mean(dim=-1, keepdim=True)
    centred = h - mu
    std = centred.std(dim=-1, keepdim=True, unbiased=True)
    return centred / (std + LN_EPS), mu, std


def interleave(tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[b, t, d] x2 -> [b, 2t, d] = [t_1, s_1, t_2, s_2, ...]."""
    b, t, d = tokens.shape
    return torch.stack([tokens, slots], dim=2).reshape(b, 2 * t, d)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float):
    """cos, sin [b, 1, n, head_dim] for integer positions [b, n] (non-interleaved halves, as megatron-core)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def slot_mask(key_valid: torch.Tensor, num_queries: int, slots: int) -> torch.Tensor:
    """SDPA mask (True = attend) [b, 1, q, k] over `slots` entries per token.

    key_valid [b, T] says which tokens are real (0 = left padding); the queries are the last `num_queries` of the
    T * slots entries. Entry e belongs to token e // slots. Causal over entries, padding masked; every query may see
    itself, so that a padded query row is never empty (its output is not used)."""
    total = key_valid.shape[1] * slots
    keys = torch.arange(total, device=key_valid.device)
    queries = keys[total - num_queries:]
    causal = keys[None, :] <= queries[:, None]
    valid = key_valid.bool().repeat_interleave(slots, dim=1)[:, None, None, :]
    return (causal[None, None] & valid) | (keys[None, :] == queries[:, None])[None, None]


class CoCoMixAttention(nn.Module):
    def __init__(self, config: CoCoMixConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.layer_idx = config.n_head, layer_idx
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(self, x, mask, rotary, cache):
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in self.c_attn(x).split(d, dim=2))
        if rotary is not None:
            cos, sin = rotary
            q = (q * cos + rotate_half(q) * sin).to(v.dtype)
            k = (k * cos + rotate_half(k) * sin).to(v.dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(out.transpose(1, 2).reshape(b, n, d))


class CoCoMixMLP(nn.Module):
    def __init__(self, config: CoCoMixConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Conv1D(inner, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, inner)
        self.act = ACT2FN[config.activation_function]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class CoCoMixBlock(nn.Module):
    """Pre-LN GPT-2 block."""

    def __init__(self, config: CoCoMixConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CoCoMixAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = CoCoMixMLP(config)

    def forward(self, x, mask, rotary, cache):
        x = x + self.attn(self.ln_1(x), mask, rotary, cache)
        return x + self.mlp(self.ln_2(x))


class CoCoMixPreTrainedModel(PreTrainedModel):
    config_class = CoCoMixConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["CoCoMixBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, Conv1D)):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, CoCoMixModel):
            for name in ("pre_bias", "pause_embedding"):
                if hasattr(module, name):
                    getattr(module, name).zero_()


class CoCoMixModel(CoCoMixPreTrainedModel):
    """Embeddings, blocks with the concept layer at insert_layer_idx, final norm: hidden states of the readout slots."""

    def __init__(self, config: CoCoMixConfig):
        super().__init__(config)
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)
        if config.position_embedding_type == "learned_absolute":
            self.wpe = nn.Embedding(config.n_positions, d)
        self.h = nn.ModuleList([CoCoMixBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        if config.mixing == "concept":
            self.pre_bias = nn.Parameter(torch.zeros(d))
            self.concept_predictor = nn.Linear(d, config.concept_dim, bias=True)
            self.compress_layer = nn.Linear(config.concept_dim, d, bias=True)
        else:
            self.pause_embedding = nn.Parameter(torch.zeros(d))
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, embeddings):
        self.wte = embeddings

    def mix(self, h: torch.Tensor, concept_steering: Optional[dict] = None):
        """The concept layer: h [b, t, d] -> (interleaved [b, 2t, d], concept logits [b, t, C] or None).

        concept_steering {concept id: scale} changes the chosen concept logits before the top-k, at every position:
        z_i <- z_i * scale (the paper's steering), or z_i + scale with the key "mode": "add"."""
        if self.config.mixing == "pause":
            return interleave(h, self.pause_embedding.to(h.dtype).expand_as(h)), None
        xn, mu, std = concept_layer_norm(h)
        logits = self.concept_predictor(xn - self.pre_bias)
        if concept_steering:
            steering = dict(concept_steering)
            add = steering.pop("mode", "multiply") == "add"
            ids = torch.tensor([int(i) for i in steering], dtype=torch.long, device=logits.device)
            scales = torch.tensor([float(v) for v in steering.values()], dtype=logits.dtype, device=logits.device)
            chosen = logits.index_select(-1, ids)
            logits = logits.index_copy(-1, ids, chosen + scales if add else chosen * scales)
        values, ids = logits.topk(self.config.concept_num, dim=-1)
        sparse = torch.zeros_like(logits).scatter(-1, ids, values)
        concept = (self.compress_layer(sparse) + self.pre_bias) * std + mu
        return interleave(h, concept), logits

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[DynamicCache] = None, use_cache: bool = False,
                concept_steering: Optional[dict] = None):
        """input_ids [b, t] (the new tokens when a cache is given); attention_mask [b, past + t] (1 = real token).
        Returns (hidden [b, t, d] after ln_f, from the concept slots, concept logits [b, t, C] or None, cache)."""
        b, t = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length(0) if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=input_ids.device)
        # Left padding: a token's position counts the real tokens before it.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        h = self.wte(input_ids)
        if self.config.position_embedding_type == "learned_absolute":
            h = h + self.wpe(positions)
        rotary = None
        head_dim = self.config.n_embd // self.config.n_head
        if self.config.position_embedding_type == "rope":
            rotary = rotary_tables(positions, head_dim, self.config.rotary_base)
        mask = slot_mask(attention_mask, t, 1)
        concept_logits = None
        for i, block in enumerate(self.h):
            if i == self.config.insert_layer_idx:
                h, concept_logits = self.mix(h, concept_steering)
                mask = slot_mask(attention_mask, 2 * t, 2)
                if rotary is not None:
                    rotary = tuple(r.repeat_interleave(2, dim=2) for r in rotary)
            h = block(h, mask, rotary, past_key_values)
        h = self.ln_f(h[:, 1::2])
        return h, concept_logits, past_key_values


class CoCoMixForCausalLM(CoCoMixPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: CoCoMixConfig):
        super().__init__(config)
        self.transformer = CoCoMixModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, embeddings):
        self.lm_head = embeddings

    def concept_logits(self, input_ids: torch.LongTensor,
                       attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The concept layer's logits z [b, t, C] for input_ids [b, t] (attention_mask as in forward), before the
        top-k: the student's prediction of the teacher's concept labels at each token (docs/design.md §4).
        Pause-token models have no concept head (ValueError)."""
        if self.config.mixing != "concept":
            raise ValueError(f"this {self.config.mixing}-token model has no concept head")
        return self.transformer(input_ids, attention_mask)[1]

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[DynamicCache] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, concept_steering: Optional[dict] = None,
                **unused) -> CausalLMOutputWithPast:
        """logits [b, t, V] (the last `logits_to_keep` positions when > 0); loss = mean next-token cross-entropy
        over labels != -100 (labels are the inputs, shifted inside, as in transformers). `concept_steering`
        ({concept id: scale}, see CoCoMixModel.mix) is also a generate() argument: it steers the prompt and every
        generated token."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden, _, cache = self.transformer(input_ids, attention_mask, past_key_values, use_cache, concept_steering)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)
