"""TopK SAE: each on-disk format against a plain re-implementation of that format's maths, plus the saver."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from megatron_cocomix.concepts import TopKSAE, check_sae_compatible, load_sae, save_saelens
from tests.helpers.concept_files import random_sae_tensors, write_openai_sae

D, C, K = 24, 96, 8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def plain_ln(x):
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    var = (xc ** 2).sum(-1, keepdim=True) / (x.shape[-1] - 1)  # unbiased
    std = var.sqrt()
    return xc / (std + 1e-5), mu, std


def plain_topk_relu(pre, k):
    values, indices = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, indices, values.clamp_min(0))
    return dense


def reference_openai(t, x, k):
    xn, mu, std = plain_ln(x)
    dense = plain_topk_relu((xn - t["pre_bias"]) @ t["encoder.weight"].T + t["latent_bias"], k)
    return dense, (dense @ t["decoder.weight"].T + t["pre_bias"]) * std + mu


def reference_saelens(w, x, k):
    xn, mu, std = plain_ln(x)
    dense = plain_topk_relu((xn - w["b_dec"]) @ w["W_enc"] + w["b_enc"], k)
    return dense, (dense @ w["W_dec"] + w["b_dec"]) * std + mu


def reference_sparsify(w, x, k):
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    values, indices = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, indices, values)
    return dense, dense @ w["W_dec"] + w["b_dec"]


def check_against(sae, reference_dense, reference_recon, x):
    values, indices = sae.encode(x)
    assert values.shape == x.shape[:-1] + (K,) and indices.shape == values.shape
    dense = torch.zeros(x.shape[:-1] + (C,)).scatter(-1, indices, values)
    assert rel_err(dense, reference_dense) < 1e-6
    assert (reference_dense > 0).sum(-1).le(K).all()
    code = sae.encode_with_stats(x)
    recon = sae.decode(code.values, code.indices, code.mu, code.std)
    assert rel_err(recon, reference_recon) < 1e-6
    assert rel_err(sae(x), reference_recon) < 1e-6


@pytest.fixture
def x():
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def test_openai_format_matches_reference(tmp_path, x):
    path = str(tmp_path / "sae.pt")
    tensors = write_openai_sae(path, D, C, K)
    sae = load_sae(path)
    assert (sae.d_model, sae.num_latents, sae.k) == (D, C, K)
    dense, recon = reference_openai(tensors, x, K)
    check_against(sae, dense, recon, x)
    assert sae.W_dec.shape == (D, C)
    torch.testing.assert_close(sae.W_dec, tensors["decoder.weight"], rtol=0, atol=0)


def test_saelens_format_matches_reference(tmp_path, x):
    t = random_sae_tensors(D, C, seed=3)
    w = {"W_enc": t["encoder.weight"].T.contiguous(), "b_enc": t["latent_bias"],
         "W_dec": t["decoder.weight"].T.contiguous(), "b_dec": t["pre_bias"]}
    folder = tmp_path / "saelens"
    folder.mkdir()
    save_file(w, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": C, "activation_fn_str": "topk",
                                                 "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True,
                                                 "normalize_activations": "layer_norm"}))
    sae = load_sae(str(folder))
    dense, recon = reference_saelens(w, x, K)
    check_against(sae, dense, recon, x)


def test_sparsify_format_matches_reference(tmp_path, x):
    t = random_sae_tensors(D, C, seed=4)
    w = {"encoder.weight": t["encoder.weight"], "encoder.bias": t["latent_bias"],
         "W_dec": t["decoder.weight"].T.contiguous(), "b_dec": t["pre_bias"]}
    folder = tmp_path / "sparsify"
    folder.mkdir()
    save_file(w, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": C // D, "normalize_decoder": True,
                                                 "num_latents": C, "k": K, "d_in": D}))
    sae = load_sae(str(folder))
    assert not sae.normalize_input
    dense, recon = reference_sparsify(w, x, K)
    check_against(sae, dense, recon, x)
    values, indices = sae.encode(x)
    torch.testing.assert_close(sae.decode(values, indices), recon, rtol=1e-6, atol=1e-6)


def test_saelens_round_trip(tmp_path, x):
    path = str(tmp_path / "sae.pt")
    write_openai_sae(path, D, C, K, seed=5)
    sae = load_sae(path)
    save_saelens(sae, str(tmp_path / "out"), extra_config={"hook_name": "hidden_states.2"})
    again = load_sae(str(tmp_path / "out"))
    assert again.normalize_input and again.k == K
    for a, b in zip(sae.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(again(x), sae(x), rtol=0, atol=0)
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["hook_name"] == "hidden_states.2"


def test_exactly_k_active_and_normalize(x):
    torch.manual_seed(0)
    sae = TopKSAE(D, C, K)
    with torch.no_grad():
        sae.latent_bias.fill_(10.0)  # every pre-activation positive: exactly k latents fire
    values, indices = sae.encode(x)
    assert (values > 0).sum(-1).eq(K).all()
    assert indices.unique(dim=-1).shape[-1] == K or all(row.unique().numel() == K for row in indices.view(-1, K))
    xn, mu, std = sae.normalize(x)
    ref_xn, ref_mu, ref_std = plain_ln(x)
    assert rel_err(xn, ref_xn) < 1e-6 and rel_err(std, ref_std) < 1e-6 and rel_err(mu, ref_mu) < 1e-6
    assert sae.dictionary.norm(dim=-1).sub(1).abs().max() < 1e-5


def test_decode_without_stats_refused_when_normalising(x):
    sae = TopKSAE(D, C, K, source="mine")
    values, indices = sae.encode(x)
    with pytest.raises(ValueError, match="normalises its input"):
        sae.decode(values, indices)


def test_gradients_flow_through_decode(x):
    sae = TopKSAE(D, C, K)
    code = sae.encode_with_stats(x)
    sae.decode(code.values, code.indices, code.mu, code.std).square().sum().backward()
    assert sae.dictionary.grad is not None and sae.dictionary.grad.abs().sum() > 0
    # Only the decoder rows of latents that fired get a gradient.
    fired = torch.zeros(C, dtype=torch.bool)
    fired[code.indices[code.values > 0]] = True
    assert sae.dictionary.grad[~fired].abs().sum() == 0


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_sae(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"pre_bias": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="missing tensor"):
        load_sae(str(bad))
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ValueError, match="without cfg.json"):
        load_sae(str(folder))
    (folder / "cfg.json").write_text("{}")
    with pytest.raises(ValueError, match="neither"):
        load_sae(str(folder))
    relu_sae = tmp_path / "relu"
    relu_sae.mkdir()
    w = {"W_enc": torch.zeros(D, C), "b_enc": torch.zeros(C), "W_dec": torch.zeros(C, D), "b_dec": torch.zeros(D)}
    save_file(w, str(relu_sae / "sae_weights.safetensors"))
    (relu_sae / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": C, "architecture": "standard"}))
    with pytest.raises(ValueError, match="only TopK"):
        load_sae(str(relu_sae))
    shape = tmp_path / "shape.pt"
    t = random_sae_tensors(D, C)
    t["decoder.weight"] = t["decoder.weight"][:, :10]
    torch.save(dict(t, activation="TopK", activation_state_dict={"k": K, "postact_fn": "ReLU"}), shape)
    with pytest.raises(ValueError, match="decoder has shape"):
        load_sae(str(shape))


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"pre_bias": Evil()}, path)
    with pytest.raises(ValueError, match="not a tensor-only"):
        load_sae(str(path))


def test_compatibility_errors_name_both_values():
    sae = TopKSAE(D, C, K, source="my_sae")
    check_sae_compatible(sae, d_model=D, num_latents=C, k=K)
    with pytest.raises(ValueError, match=f"my_sae has d_model {D} but teacher t expects 64"):
        check_sae_compatible(sae, d_model=64, where="teacher t")
    with pytest.raises(ValueError, match=f"num_latents {C} but .* expects 32768"):
        check_sae_compatible(sae, num_latents=32768, where="--concept-dim")
    with pytest.raises(ValueError, match=f"k {K} but .* expects 32"):
        check_sae_compatible(sae, k=32, where="--concept-topk")
