"""The CoCoMix student and its ablations against an independent plain-torch reference written from docs/design.md
§4-§7 (TP1, fp32).

The reference below uses no megatron-core: token embeddings + learned positions (or rotary, where a concept slot
takes its token's position), pre-LN GPT blocks with dense causal attention, and at block L the concept head:

    xn, mu, std = LN_sae(h)                  # unbiased std, eps added to std, not detached
    z  = W_pred (xn - pre_bias) + b_pred     # [b, T, C]
    v  = dense vector holding TopK_k(z) at its ids, zeros elsewhere
    c^ = (v @ W_comp^T + b_comp + pre_bias) * std + mu          # a DENSE [C] x [C, d] matmul
    h  = [h_1, c^_1, h_2, c^_2, ...]         # 2T positions, plain causal mask, for blocks >= L
    logits = LN_f(h[1::2]) @ E^T             # next-token logits from the concept slots
    loss = CE(logits, next tokens) + 0.1 * mean over labels != -1 of CE(z, label)

The ablations of §4's "Variants" change the step at block L and the readout:

    add     h = h + c^            T positions, logits from every position, same loss
    none    h unchanged           T positions; z and the concept loss as above, the compression never runs
    no concept loss               interleave, loss = CE(logits, next tokens) alone (z still computed)
    pause   h = [h_1, p, h_2, p, ...] with one learned p [d]; 2T positions, plain causal mask, rotary position of
            slot 2i+1 = i, logits from h[1::2]; no concept head, loss = CE(logits, next tokens)

It is given the same weights as the project's model (read from its megatron state by name; megatron's fused
QKV weight is [heads, (q, k, v), head_dim] along its output dim), with every parameter (biases and norms
included) redrawn at random so that a mis-mapped one shows. Compared: logits, concept logits, the lm loss,
the concept loss, and the gradient of the total loss w.r.t. every parameter.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.cocomix_assets import cocomix_flags
from tests.helpers.launch import TINY_GPT

SEQ, BATCH, LAYERS, HEADS, HIDDEN, CONCEPT_LAYER, TOPK, NUM_LABELS = 32, 2, 4, 4, 64, 2, 4, 4
TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ the reference
def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rotate(x, positions, base=10000.0):
    """Rotary embedding (non-interleaved halves) of x [b, heads, n, hd] at integer positions [n]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()


def block(x, p, positions=None, allowed=None):
    """Pre-LN GPT block on x [b, n, d] with a dense causal mask (or `allowed` [b, n, n], True = attend);
    `positions` turns on rotary."""
    b, n, d = x.shape
    hd = d // HEADS
    h = layer_norm(x, p["ln1_w"], p["ln1_b"])
    q, k, v = [(h @ p[f"w{name}"].T + p[f"b{name}"]).view(b, n, HEADS, hd).transpose(1, 2) for name in "qkv"]
    if positions is not None:
        q, k = rotate(q, positions), rotate(k, positions)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if allowed is None:
        allowed = torch.ones(n, n, dtype=torch.bool).tril()[None]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + attn @ p["wo"].T + p["bo"]
    h = layer_norm(x, p["ln2_w"], p["ln2_b"])
    return x + F.gelu(h @ p["fc1_w"].T + p["fc1_b"]) @ p["fc2_w"].T + p["fc2_b"]


def concept_step(x, c, with_compression=True):
    """The concept head on x [b, T, d]: (z [b, T, C], c^ [b, T, d] or None)."""
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True, unbiased=True)
    xn = (x - mu) / (std + 1e-5)
    z = (xn - c["pre_bias"]) @ c["w_pred"].T + c["b_pred"]
    if not with_compression:
        return z, None
    values, ids = z.topk(TOPK, dim=-1)
    dense = torch.zeros_like(z).scatter(-1, ids, values)
    return z, (dense @ c["w_comp"].T + c["b_comp"] + c["pre_bias"]) * std + mu


def reference_forward(w, tokens, targets, concept_labels, rotary=False, variant="interleave", documents=None):
    """tokens / targets [b, T], concept_labels [b, T, K] -> (logits [b, T, V], z [b, T, C] or None, lm loss,
    concept loss or None). variant: interleave (CoCoMix), add, none, pause. documents [b, T]: each token's
    document id; attention stays within a document (--reset-attention-mask), otherwise plain causal."""
    b, t = tokens.shape
    allowed = None
    if documents is not None:
        allowed = (documents[:, :, None] == documents[:, None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    x = w["wte"][tokens]
    if not rotary:
        x = x + w["wpe"][:t]
    token_pos = torch.arange(t)
    for p in w["blocks"][:CONCEPT_LAYER]:
        x = block(x, p, token_pos if rotary else None, allowed)

    z = None
    if variant == "pause":
        slot = w["pause"].expand_as(x)
    else:
        z, concept = concept_step(x, w["concept"], with_compression=variant != "none")
        slot = concept if variant == "interleave" else None
    if slot is not None:  # interleave, pause: 2T positions, slot 2i + 1 at token i's position
        x = torch.stack([x, slot], dim=2).reshape(b, 2 * t, -1)
        positions = torch.arange(2 * t) // 2
        if allowed is not None:  # slot (i, j): tokens (i // 2, j // 2) in one document, and j <= i
            allowed = allowed[:, positions][:, :, positions] & torch.ones(2 * t, 2 * t, dtype=torch.bool).tril()
    else:
        if variant == "add":
            x = x + concept
        positions = token_pos
    for p in w["blocks"][CONCEPT_LAYER:]:
        x = block(x, p, positions if rotary else None, allowed)
    if slot is not None:
        x = x[:, 1::2]

    logits = layer_norm(x, w["lnf_w"], w["lnf_b"]) @ w["wte"].T
    lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if z is None:
        return logits, None, lm_loss, None
    valid = concept_labels >= 0
    log_probs = z.log_softmax(-1)
    picked = torch.gather(log_probs, -1, concept_labels.clamp(min=0))
    concept_loss = -(picked * valid).sum() / valid.sum()
    return logits, z, lm_loss, concept_loss


def reference_weights(state):
    """Megatron parameter names -> the reference's plain tensors (leaf views into `state`)."""
    d, hd = HIDDEN, HIDDEN // HEADS

    def qkv(name):
        fused = state[name]
        grouped = fused.view(HEADS, 3, hd, *fused.shape[1:])  # [heads, (q, k, v), hd, (d)]
        return [grouped[:, i].reshape(d, *fused.shape[1:]) for i in range(3)]

    blocks = []
    for i in range(LAYERS):
        pre = f"decoder.layers.{i}."
        wq, wk, wv = qkv(pre + "self_attention.linear_qkv.weight")
        bq, bk, bv = qkv(pre + "self_attention.linear_qkv.bias")
        blocks.append(dict(
            ln1_w=state[pre + "input_layernorm.weight"], ln1_b=state[pre + "input_layernorm.bias"],
            wq=wq, wk=wk, wv=wv, bq=bq, bk=bk, bv=bv,
            wo=state[pre + "self_attention.linear_proj.weight"], bo=state[pre + "self_attention.linear_proj.bias"],
            ln2_w=state[pre + "pre_mlp_layernorm.weight"], ln2_b=state[pre + "pre_mlp_layernorm.bias"],
            fc1_w=state[pre + "mlp.linear_fc1.weight"], fc1_b=state[pre + "mlp.linear_fc1.bias"],
            fc2_w=state[pre + "mlp.linear_fc2.weight"], fc2_b=state[pre + "mlp.linear_fc2.bias"]))
    mix = f"decoder.layers.{CONCEPT_LAYER}.concept_mixing."
    concept = None
    if mix + "predictor.pre_bias" in state:
        concept = dict(pre_bias=state[mix + "predictor.pre_bias"], w_pred=state[mix + "predictor.linear.weight"],
                       b_pred=state[mix + "predictor.linear.bias"],
                       w_comp=state[mix + "compress_weight"].T,  # stored as concept rows [C, d]; W_comp is [d, C]
                       b_comp=state[mix + "compress_bias"])
    return dict(wte=state["embedding.word_embeddings.weight"], wpe=state.get("embedding.position_embeddings.weight"),
                blocks=blocks, concept=concept, pause=state.get(mix + "pause_embedding"),
                lnf_w=state["decoder.final_layernorm.weight"], lnf_b=state["decoder.final_layernorm.bias"])


# ------------------------------------------------------------------------------------------ the project model
def build_project_model(extra_flags, pause=False):
    from megatron.core.utils import get_model_config

    import pretrain_cocomix
    from megatron_cocomix.arguments import parse_args
    from megatron_cocomix.data.tokenizer import build_tokenizer
    from megatron_cocomix.distributed import initialize_distributed
    from megatron_cocomix.global_vars import set_args, set_tokenizer
    from megatron_cocomix.model.gpt import initialize_weights

    variant = ["--pause-tokens", "--concept-layer", str(CONCEPT_LAYER)] if pause else cocomix_flags(CONCEPT_LAYER, TOPK)
    args = parse_args(TINY_GPT + variant + list(extra_flags))
    pretrain_cocomix.resolve_concept_args(args)
    set_args(args)
    initialize_distributed(args)
    set_tokenizer(build_tokenizer(args))
    model = pretrain_cocomix.model_provider(pre_process=True, post_process=True)
    initialize_weights([model], args.seed, get_model_config(model), tied_embeddings=True)
    # Redraw everything (biases and norm weights included) so that every parameter matters.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.05 * noise)
    return args, model


def project_forward(model, tokens, targets, concept_labels, attention_mask=None):
    """The project's model as training calls it: (logits, z or None, lm loss, concept loss or None); backward of the
    lm loss carries the concept loss's gradient too (MoEAuxLossAutoScaler with loss scale 1). attention_mask:
    megatron's [b, 1, T, T] (True = masked out), as --reset-attention-mask gives it, or None (causal)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_cocomix import metrics
    from megatron_cocomix.model.concept_head import ConceptPredictor

    captured = {}
    predictor = next((m for m in model.modules() if isinstance(m, ConceptPredictor)), None)
    handle = None
    if predictor is not None:
        handle = predictor.register_forward_hook(lambda mod, inp, out: captured.__setitem__("z", out[0]))
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    # Pause tokens read no labels (forward_step passes none): the block gets context=None.
    labels = concept_labels.transpose(0, 1).contiguous() if predictor is not None else None
    context = {"context": labels}
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    metrics.reset()
    try:
        with torch.no_grad():
            logits = model(tokens, position_ids, attention_mask, extra_block_kwargs=context)
        metrics.reset()
        per_token = model(tokens, position_ids, attention_mask, labels=targets, extra_block_kwargs=context)
    finally:
        if handle is not None:
            handle.remove()
    lm_loss = per_token.float().mean()
    concept_loss = metrics.reduce().get("concept loss")
    z = captured["z"].transpose(0, 1) if "z" in captured else None
    return logits, z, lm_loss, concept_loss


def sample_batch(vocab, num_concepts, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    labels = torch.randint(0, num_concepts, (BATCH, SEQ, NUM_LABELS), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.25] = -1
    labels[:, -1] = -1  # the last position never has labels
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), labels


# variant: (flags, the reference's variant, weight of the concept loss, parameters that get no gradient)
VARIANTS = {
    "cocomix": ([], "interleave", 0.1, ()),
    "add": (["--concept-mixing", "add"], "add", 0.1, ()),
    "none": (["--concept-mixing", "none"], "none", 0.1, ("compress_weight", "compress_bias")),
    "no_concept_loss": (["--no-concept-loss"], "interleave", 0.0, ()),
    "pause": (None, "pause", 0.0, ()),
}


@pytest.mark.parametrize("position_embedding", ["learned_absolute", "rope"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_plain_reference(single_process, variant, position_embedding):
    flags, reference_variant, weight, no_grad = VARIANTS[variant]
    rotary = position_embedding == "rope"
    pause = flags is None
    args, model = build_project_model(["--position-embedding-type", position_embedding] + (flags or []),
                                      pause=pause)
    assert args.padded_vocab_size == 256
    num_concepts = 64 if pause else args.concept_dim
    assert num_concepts == 64
    tokens, targets, concept_labels = sample_batch(255, num_concepts)

    logits, z, lm_loss, concept_loss = project_forward(model, tokens, targets, concept_labels)
    lm_loss.backward()
    project_grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}

    state = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    ref_logits, ref_z, ref_lm, ref_concept = reference_forward(reference_weights(state), tokens, targets,
                                                               concept_labels, rotary=rotary,
                                                               variant=reference_variant)
    assert logits.shape == (BATCH, SEQ, 256)
    torch.testing.assert_close(logits, ref_logits.detach(), **TOL)
    torch.testing.assert_close(lm_loss.detach(), ref_lm.detach(), **TOL)
    if pause:
        assert z is None and concept_loss is None
        assert sum(name.endswith("pause_embedding") for name in state) == 1
    else:
        torch.testing.assert_close(z.detach(), ref_z.detach(), **TOL)
        # The concept loss is measured whatever its weight.
        assert abs(concept_loss - ref_concept.item()) <= 1e-5 * abs(ref_concept.item())
        # Sanity: the concept loss is near log(C) for random weights, and the labels' -1 entries were ignored.
        assert 0.5 * math.log(64) < ref_concept.item() < 2 * math.log(64)

    (ref_lm if ref_concept is None else ref_lm + weight * ref_concept).backward()
    assert set(project_grads) == set(state), "parameter sets differ"
    for name, tensor in state.items():
        if name.rsplit(".", 1)[-1] in no_grad:
            assert project_grads[name] is None and tensor.grad is None, f"{name} should get no gradient"
            continue
        assert tensor.grad is not None, f"{name}: the reference does not use it"
        assert project_grads[name] is not None, f"{name}: the project model gives it no gradient"
        torch.testing.assert_close(project_grads[name], tensor.grad, rtol=1e-4, atol=1e-6, msg=name)

    # Documents (--reset-attention-mask): sequence 0 holds three, sequence 1 two; megatron's mask doubled over the
    # 2T slots for interleave and pause (docs/design.md §5).
    documents = torch.zeros(BATCH, SEQ, dtype=torch.long)
    documents[0, 9:], documents[0, 20:], documents[1, 17:] = 1, 2, 1
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    mask = ~((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]
    model.zero_grad(set_to_none=True)
    logits, z, lm_loss, concept_loss = project_forward(model, tokens, targets, concept_labels, attention_mask=mask)
    with torch.no_grad():
        ref_logits, ref_z, ref_lm, ref_concept = reference_forward(
            reference_weights(state), tokens, targets, concept_labels, rotary=rotary, variant=reference_variant,
            documents=documents)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(lm_loss.detach(), ref_lm, **TOL)
    if not pause:
        torch.testing.assert_close(z.detach(), ref_z, **TOL)
