"""SAE quality metrics computed independently of megatron_cocomix: the TopK SAE of an OpenAI-format state dict in
numpy (float64), the teacher's activations and losses from the plain Hugging Face model (its hidden_states and
logits, a forward hook for the splice).

For activations x [n, d] and the SAE's reconstruction x_hat (LN with the unbiased std, eps on the std, TopK of the
pre-activations, ReLU, decode, de-normalise):
    FVU  = sum ||x - x_hat||^2 / sum ||x - mean_n(x)||^2       (the mean over the tokens)
    L0   = mean over tokens of the number of positive latent activations
    dead = fraction of latents positive on no token
    delta LM loss = CE(x_hat spliced in at hidden_states[layer], at every position) - CE(clean), CE the mean over
    sequences of each sequence's mean next-token cross-entropy.
"""

from __future__ import annotations

from typing import Dict

import numpy
import torch


def openai_sae(path: str) -> Dict[str, object]:
    """The tensors of an OpenAI .pt SAE as float64 arrays, and its k."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    out = {name: state[name].double().numpy() for name in ("pre_bias", "encoder.weight", "latent_bias",
                                                            "decoder.weight")}
    out["k"] = int(state["activation_state_dict"]["k"])
    return out


def encode_decode(sae: Dict[str, object], x: numpy.ndarray):
    """(x_hat [..., d], post-ReLU values of the top-k [..., k], their latent ids [..., k]) for x [..., d]."""
    mu = x.mean(-1, keepdims=True)
    std = (x - mu).std(-1, ddof=1, keepdims=True)
    xn = (x - mu) / (std + 1e-5)
    pre = (xn - sae["pre_bias"]) @ sae["encoder.weight"].T + sae["latent_bias"]
    ids = numpy.argsort(-pre, axis=-1, kind="stable")[..., :sae["k"]]
    values = numpy.maximum(numpy.take_along_axis(pre, ids, -1), 0.0)
    directions = sae["decoder.weight"].T[ids]  # [..., k, d]
    xn_hat = (values[..., None] * directions).sum(-2) + sae["pre_bias"]
    return xn_hat * std + mu, values, ids


def metrics(sae_path: str, teacher_dir: str, layer: int, windows: numpy.ndarray, skip: int) -> Dict[str, float]:
    """The module docstring's metrics over token windows [b, t], FVU / L0 / dead on positions skip.. ."""
    from transformers import AutoModelForCausalLM

    sae = openai_sae(sae_path)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    tokens = torch.from_numpy(windows.astype(numpy.int64))
    with torch.no_grad():
        clean = model(input_ids=tokens, output_hidden_states=True)
    hidden = clean.hidden_states[layer].double().numpy()  # [b, t, d]
    x = hidden[:, skip:].reshape(-1, hidden.shape[-1])
    x_hat, values, ids = encode_decode(sae, x)
    active = values > 0
    fired = numpy.zeros(sae["encoder.weight"].shape[0], dtype=bool)
    fired[ids[active]] = True
    spliced_hidden = torch.from_numpy(encode_decode(sae, hidden)[0]).float()

    def splice(module, inputs, output):
        return (spliced_hidden,) + tuple(output[1:]) if isinstance(output, tuple) else spliced_hidden

    block = model.base_model.h[layer - 1]  # hidden_states[layer] is the output of block layer - 1
    handle = block.register_forward_hook(splice)
    try:
        with torch.no_grad():
            spliced = model(input_ids=tokens)
    finally:
        handle.remove()
    clean_loss, spliced_loss = _mean_sequence_ce(clean.logits, tokens), _mean_sequence_ce(spliced.logits, tokens)
    return {"fvu": float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()),
            "l0": float(active.sum(-1).mean()), "dead_fraction": float(1.0 - fired.mean()), "tokens": x.shape[0],
            "clean_loss": clean_loss, "spliced_loss": spliced_loss, "delta_lm_loss": spliced_loss - clean_loss,
            "k": sae["k"]}


def _mean_sequence_ce(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [b, t - 1]
    return float(nll.mean(dim=1).mean())
