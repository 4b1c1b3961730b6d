"""TopK sparse autoencoder (OpenAI "v5" maths) and loaders for the three on-disk formats.

For a teacher residual x [..., d] (d = teacher width), C latents and k active latents per token:

    LN(x):   mu = mean(x, -1); xc = x - mu; std = std(xc, -1, unbiased); xn = xc / (std + 1e-5)
    encode:  pre = W_enc (xn - pre_bias) + latent_bias          W_enc [C, d], pre [..., C]
             values, indices = TopK_k(pre); values = ReLU(values)          [..., k] each
    decode:  x_hat = (sum_j values_j W_dec[:, indices_j] + pre_bias) * std + mu   W_dec [d, C]

Without input normalisation (sparsify SAEs) mu = 0 and std = 1. The decoder is stored as `dictionary`
[C, d] (one row per latent: its decoder direction) so that decoding the k active latents is a gather of
k rows (`F.embedding_bag`), never a dense [N, C] x [C, d] matmul; `W_dec` gives the [d, C] view.

Formats read by `load_sae` (only tensors are deserialised: safetensors or torch.load(weights_only=True)):
- OpenAI `.pt` state dict: pre_bias [d], encoder.weight [C, d], latent_bias [C], decoder.weight [d, C],
  activation "TopK", activation_state_dict {k, postact_fn}. Input LN on (as in the CoCoMix reference).
- SAELens folder: cfg.json (d_in, d_sae, k / activation_fn_kwargs.k, normalize_activations) +
  sae_weights.safetensors: W_enc [d, C], b_enc [C], W_dec [C, d], b_dec [d].
- sparsify folder: cfg.json (k, num_latents / expansion_factor, d_in) + sae.safetensors:
  encoder.weight [C, d], encoder.bias [C], W_dec [C, d], b_dec [d]; no input LN.
`save_saelens` writes the SAELens layout, which round-trips through `load_sae`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

LN_EPS = 1e-5
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"


class SAEShape(NamedTuple):
    """What an SAE file says about its shape, read without loading its weights."""

    d_model: int
    num_latents: int
    k: int


class SparseCode(NamedTuple):
    """The k active latents of each token and the LN statistics needed to decode back to x's scale."""

    values: torch.Tensor  # [..., k] post-ReLU activations c
    indices: torch.Tensor  # [..., k] latent ids (int64)
    preacts: torch.Tensor  # [..., k] pre-activations of the same latents (before ReLU)
    mu: torch.Tensor  # [..., 1]
    std: torch.Tensor  # [..., 1]


def layer_norm_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenAI's SAE LN: unbiased std over the last dim, eps added to the std (not the variance)."""
    mu = x.mean(dim=-1, keepdim=True)
    xc = x - mu
    std = xc.std(dim=-1, keepdim=True, unbiased=True)
    return xc / (std + LN_EPS), mu, std


class TopKSAE(nn.Module):
    """TopK SAE; see the module docstring for the maths. Parameters are fp32 unless cast."""

    def __init__(self, d_model: int, num_latents: int, k: int, normalize_input: bool = True,
                 source: str = "<in memory>") -> None:
        super().__init__()
        if not 0 < k <= num_latents:
            raise ValueError(f"SAE {source}: k {k} must be in [1, num_latents {num_latents}]")
        self.d_model, self.num_latents, self.k = d_model, num_latents, k
        self.normalize_input = normalize_input
        self.source = source
        self.W_enc = nn.Parameter(torch.empty(num_latents, d_model))
        self.latent_bias = nn.Parameter(torch.zeros(num_latents))
        self.dictionary = nn.Parameter(torch.empty(num_latents, d_model))
        self.pre_bias = nn.Parameter(torch.zeros(d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """OpenAI init: random encoder, decoder = encoder^T with unit-norm latent directions."""
        nn.init.kaiming_uniform_(self.W_enc, a=5 ** 0.5)
        with torch.no_grad():
            self.dictionary.copy_(self.W_enc)
            self.normalize_dictionary_()
            self.latent_bias.zero_()
            self.pre_bias.zero_()

    @property
    def W_dec(self) -> torch.Tensor:
        """Decoder [d, C] (a view of `dictionary`)."""
        return self.dictionary.t()

    def decoder_columns(self, indices: torch.Tensor) -> torch.Tensor:
        """W_dec[:, indices] laid out as [..., k, d]: the decoder directions of the given latents."""
        return self.dictionary[indices]

    def freeze(self) -> "TopKSAE":
        self.requires_grad_(False)
        return self.eval()

    # ----------------------------------------------------------------------------------------------- maths
    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(xn, mu, std) in x's dtype; identity statistics (0, 1) when the SAE has no input LN. The statistics
        are computed in fp32 whatever x's dtype (a bf16 mean / std over d would be the least precise step)."""
        if self.normalize_input:
            return tuple(t.to(x.dtype) for t in layer_norm_stats(x.float()))
        ones = torch.ones(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)
        return x, torch.zeros_like(ones), ones

    def preactivation(self, xn: torch.Tensor) -> torch.Tensor:
        """pre = W_enc (xn - pre_bias) + latent_bias, [..., C] (the one dense product of the SAE), in the SAE's
        dtype."""
        return F.linear(xn - self.pre_bias, self.W_enc, self.latent_bias)

    def encode_with_stats(self, x: torch.Tensor) -> SparseCode:
        xn, mu, std = self.normalize(x)
        pre = self.preactivation(xn)
        top_pre, indices = pre.topk(self.k, dim=-1)
        return SparseCode(F.relu(top_pre), indices, top_pre, mu, std)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k active latents, each [..., k]."""
        code = self.encode_with_stats(x)
        return code.values, code.indices

    def decode_normalized(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """W_dec c + pre_bias in the normalised space, [..., d], from the k active latents only."""
        lead = values.shape[:-1]
        flat = F.embedding_bag(indices.reshape(-1, indices.shape[-1]), self.dictionary,
                               per_sample_weights=values.reshape(-1, values.shape[-1]).to(self.dictionary.dtype),
                               mode="sum")
        return flat.reshape(*lead, self.d_model) + self.pre_bias

    def decode(self, values: torch.Tensor, indices: torch.Tensor, mu: Optional[torch.Tensor] = None,
               std: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_hat = (W_dec c + pre_bias) * std + mu. `mu`/`std` come from `encode_with_stats` (or
        `normalize`); they are required when the SAE normalises its input, since x's scale is lost otherwise."""
        xn_hat = self.decode_normalized(values, indices)
        if mu is None or std is None:
            if self.normalize_input:
                raise ValueError(f"SAE {self.source} normalises its input: decode needs the mu and std of "
                                 "encode_with_stats (or decode_normalized for the normalised space)")
            return xn_hat
        return xn_hat * std + mu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat of x, same shape."""
        code = self.encode_with_stats(x)
        return self.decode(code.values, code.indices, code.mu, code.std)

    @torch.no_grad()
    def normalize_dictionary_(self) -> None:
        self.dictionary.div_(self.dictionary.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_latents={self.num_latents}, k={self.k}, "
                f"normalize_input={self.normalize_input}")


def check_sae_compatible(sae: TopKSAE, *, d_model: Optional[int] = None, num_latents: Optional[int] = None,
                         k: Optional[int] = None, where: str = "") -> None:
    """Refuse an SAE whose width / d_model / k disagree with what the caller expects, naming both values."""
    for name, expected in (("d_model", d_model), ("num_latents", num_latents), ("k", k)):
        got = getattr(sae, name)
        if expected is not None and got != expected:
            raise ValueError(f"SAE {sae.source} has {name} {got} but {where or 'the caller'} expects {expected}")


# ----------------------------------------------------------------------------------------------------- loaders
def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _require(state: dict, keys: tuple[str, ...], path: str) -> None:
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"SAE {path}: missing tensor(s) {', '.join(missing)} (found {', '.join(sorted(state))})")


def _build(path: str, W_enc: torch.Tensor, latent_bias: torch.Tensor, dictionary: torch.Tensor,
           pre_bias: torch.Tensor, k: int, normalize_input: bool) -> TopKSAE:
    num_latents, d_model = W_enc.shape
    expected = {"latent bias": (latent_bias, (num_latents,)), "decoder": (dictionary, (num_latents, d_model)),
                "pre_bias": (pre_bias, (d_model,))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"SAE {path}: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                             f"for an encoder of shape {(num_latents, d_model)}")
    sae = TopKSAE(d_model, num_latents, int(k), normalize_input=normalize_input, source=path)
    with torch.no_grad():
        for param, tensor in ((sae.W_enc, W_enc), (sae.latent_bias, latent_bias), (sae.dictionary, dictionary),
                              (sae.pre_bias, pre_bias)):
            param.copy_(tensor.float())
    return sae


def _load_openai(path: str, normalize_input: bool) -> TopKSAE:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code in it, or not a torch file at all
        raise ValueError(f"SAE {path}: not a tensor-only torch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"SAE {path}: expected a state dict, got {type(state).__name__}")
    _require(state, ("pre_bias", "encoder.weight", "latent_bias", "decoder.weight"), path)
    activation = state.get("activation", "TopK")
    if activation != "TopK":
        raise ValueError(f"SAE {path}: activation {activation!r} is not supported (only TopK)")
    act_state = state.get("activation_state_dict", {})
    if "k" not in act_state:
        raise ValueError(f"SAE {path}: activation_state_dict has no k")
    postact = act_state.get("postact_fn", "ReLU")
    if postact != "ReLU":
        raise ValueError(f"SAE {path}: postact_fn {postact!r} is not supported (only ReLU)")
    k = int(act_state["k"])
    return _build(path, state["encoder.weight"], state["latent_bias"], state["decoder.weight"].t(),
                  state["pre_bias"], k, normalize_input)


def _load_saelens(path: str, cfg: dict, normalize_input: Optional[bool]) -> TopKSAE:
    state = load_file(os.path.join(path, SAELENS_WEIGHTS))
    _require(state, ("W_enc", "b_enc", "W_dec", "b_dec"), path)
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k"))
    architecture = cfg.get("architecture", cfg.get("activation_fn_str", cfg.get("activation_fn")))
    if k is None or (architecture is not None and str(architecture).lower() not in ("topk", "top_k")):
        raise ValueError(f"SAE {path}: {SAELENS_CONFIG} describes a {architecture!r} SAE without k; only TopK SAEs "
                         "are supported")
    if not cfg.get("apply_b_dec_to_input", True):
        raise ValueError(f"SAE {path}: apply_b_dec_to_input false is not supported (the encoder subtracts b_dec)")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, "layer_norm"):
        raise ValueError(f"SAE {path}: normalize_activations {norm!r} is not supported (none or layer_norm)")
    if normalize_input is None:
        normalize_input = norm == "layer_norm"
    return _build(path, state["W_enc"].t(), state["b_enc"], state["W_dec"], state["b_dec"], k, normalize_input)


def _load_sparsify(path: str, cfg: dict, normalize_input: Optional[bool]) -> TopKSAE:
    state = load_file(os.path.join(path, SPARSIFY_WEIGHTS))
    if "W_skip" in state or cfg.get("skip_connection"):
        raise ValueError(f"SAE {path}: sparsify skip connections (W_skip) are not supported")
    _require(state, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path)
    if "k" not in cfg:
        raise ValueError(f"SAE {path}: cfg.json has no k")
    return _build(path, state["encoder.weight"], state["encoder.bias"], state["W_dec"], state["b_dec"], cfg["k"],
                  bool(normalize_input))


def load_sae(path: str, normalize_input: Optional[bool] = None, device: Optional[torch.device | str] = None,
             dtype: torch.dtype = torch.float32) -> TopKSAE:
    """Load a TopK SAE from an OpenAI `.pt` file, a SAELens folder or a sparsify folder (see module docstring).

    `normalize_input` overrides the format's default input LN (OpenAI: on, SAELens: its cfg, sparsify: off).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"SAE {path}: no such file or directory")
    if os.path.isdir(path):
        cfg_path = os.path.join(path, SAELENS_CONFIG)
        if not os.path.exists(cfg_path):
            raise ValueError(f"SAE {path}: folder without {SAELENS_CONFIG} (expected a SAELens or sparsify SAE)")
        cfg = _read_json(cfg_path)
        if os.path.exists(os.path.join(path, SAELENS_WEIGHTS)):
            sae = _load_saelens(path, cfg, normalize_input)
        elif os.path.exists(os.path.join(path, SPARSIFY_WEIGHTS)):
            sae = _load_sparsify(path, cfg, normalize_input)
        else:
            raise ValueError(f"SAE {path}: neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} (sparsify) found")
    else:
        sae = _load_openai(path, True if normalize_input is None else normalize_input)
    return sae.to(device=device, dtype=dtype)


def read_sae_shape(path: str) -> SAEShape:
    """(d_model, num_latents, k) of the SAE at `path` (any format `load_sae` reads) from its config and tensor
    headers: safetensors headers, or a memory-mapped torch file, so no weight is read into memory."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"SAE {path}: no such file or directory")
    if not os.path.isdir(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a pickle with code in it, or not a torch file at all
            raise ValueError(f"SAE {path}: not a tensor-only torch state dict ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise ValueError(f"SAE {path}: expected a state dict, got {type(state).__name__}")
        _require(state, ("encoder.weight",), path)
        num_latents, d_model = state["encoder.weight"].shape
        k = (state.get("activation_state_dict") or {}).get("k")
        if k is None:
            raise ValueError(f"SAE {path}: activation_state_dict has no k")
        return SAEShape(int(d_model), int(num_latents), int(k))
    from safetensors import safe_open

    cfg_path = os.path.join(path, SAELENS_CONFIG)
    if not os.path.exists(cfg_path):
        raise ValueError(f"SAE {path}: folder without {SAELENS_CONFIG} (expected a SAELens or sparsify SAE)")
    cfg = _read_json(cfg_path)
    for weights, key, latents_dim in ((SAELENS_WEIGHTS, "W_enc", 1), (SPARSIFY_WEIGHTS, "encoder.weight", 0)):
        file = os.path.join(path, weights)
        if os.path.exists(file):
            with safe_open(file, framework="pt") as f:
                if key not in f.keys():
                    raise ValueError(f"SAE {path}: missing tensor(s) {key} (found {', '.join(sorted(f.keys()))})")
                shape = f.get_slice(key).get_shape()
            k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
            if k is None:
                raise ValueError(f"SAE {path}: {SAELENS_CONFIG} has no k (only TopK SAEs are supported)")
            return SAEShape(int(shape[1 - latents_dim]), int(shape[latents_dim]), int(k))
    raise ValueError(f"SAE {path}: neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} (sparsify) found")


def save_saelens(sae: TopKSAE, path: str, extra_config: Optional[dict] = None) -> None:
    """Write `sae` as a SAELens folder (cfg.json + sae_weights.safetensors); the folder is created.

    Weights are written to a temporary name first and renamed, so an interrupted save never leaves a torn file.
    """
    os.makedirs(path, exist_ok=True)
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_model,
        "d_sae": sae.num_latents,
        "k": sae.k,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": sae.k},
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if sae.normalize_input else "none",
        "dtype": "float32",
    }
    cfg.update(extra_config or {})
    tensors = {
        "W_enc": sae.W_enc.detach().t().float().contiguous().cpu(),
        "b_enc": sae.latent_bias.detach().float().contiguous().cpu(),
        "W_dec": sae.dictionary.detach().float().contiguous().cpu(),
        "b_dec": sae.pre_bias.detach().float().contiguous().cpu(),
    }
    tmp_weights = os.path.join(path, SAELENS_WEIGHTS + ".tmp")
    save_file(tensors, tmp_weights)
    tmp_cfg = os.path.join(path, SAELENS_CONFIG + ".tmp")
    with open(tmp_cfg, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp_weights, os.path.join(path, SAELENS_WEIGHTS))
    os.replace(tmp_cfg, os.path.join(path, SAELENS_CONFIG))


def sae_fingerprint(path: str) -> str:
    """sha256 of the SAE's weight file(s): identifies the SAE in label fingerprints."""
    path = os.fspath(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, name) for name in os.listdir(path)
        if name in (SAELENS_CONFIG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS))
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
