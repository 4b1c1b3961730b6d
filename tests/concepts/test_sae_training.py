"""SAE training recovers a known sparse dictionary; the training maths (projection, unit norm, AuxK) hold."""

import copy

import torch

from megatron_cocomix.concepts import TopKSAE
from megatron_cocomix.concepts.sae_training import SAETrainer, evaluate_sae, geometric_median

D, C_TRUE, K_TRUE = 32, 48, 3


def sparse_data(n, atoms, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(atoms.shape[0], generator=g)[:K_TRUE] for _ in range(n)])
    coef = torch.rand(n, K_TRUE, generator=g) * 2 + 0.5
    return (coef[..., None] * atoms[idx]).sum(1)


def true_atoms(seed=0):
    atoms = torch.randn(C_TRUE, D, generator=torch.Generator().manual_seed(seed))
    return atoms / atoms.norm(dim=-1, keepdim=True)


def test_recovers_known_sparse_dictionary():
    torch.manual_seed(0)
    atoms = true_atoms()
    sae = TopKSAE(D, 64, K_TRUE)
    trainer = SAETrainer(sae, lr=4e-3, dead_tokens=2048, k_aux=16)
    trainer.init_pre_bias(sparse_data(1024, atoms, seed=1))
    for step in range(600):
        metrics = trainer.step(sparse_data(256, atoms, seed=100 + step))
    held_out = [sparse_data(512, atoms, seed=10_000 + i) for i in range(2)]
    result = evaluate_sae(sae, None, held_out)
    print("synthetic SAE:", result, "train", metrics)
    assert result["fvu"] < 0.1
    assert result["l0"] <= K_TRUE
    assert 0.0 <= result["dead_fraction"] < 1.0
    # The learned decoder rows match the true atoms (after the SAE's input LN, which centres each token).
    centred = atoms - atoms.mean(-1, keepdim=True)
    centred = centred / centred.norm(dim=-1, keepdim=True)
    best_cos = (centred @ sae.dictionary.detach().T).max(dim=1).values
    assert (best_cos > 0.9).float().mean() > 0.8, best_cos


def test_decoder_rows_stay_unit_norm_and_grad_is_projected():
    torch.manual_seed(1)
    sae = TopKSAE(D, 64, 4)
    trainer = SAETrainer(sae, lr=1e-2)
    x = torch.randn(128, D)
    rows_before = sae.dictionary.detach().clone()
    trainer.step(x)
    assert sae.dictionary.norm(dim=-1).sub(1).abs().max() < 1e-5
    grad = sae.dictionary.grad  # what Adam saw: no component along the rows it was computed at
    assert grad.norm() > 0
    assert (grad * rows_before).sum(-1).abs().max() < 1e-6 * grad.norm()


def test_auxk_gives_dead_latents_a_gradient():
    torch.manual_seed(2)
    atoms = true_atoms(3)
    sae = TopKSAE(D, 64, K_TRUE)
    with torch.no_grad():
        sae.latent_bias[32:] = 5.0  # the upper half always wins the top-k; the lower half never fires
    trainer = SAETrainer(sae, lr=4e-3, dead_tokens=256, k_aux=16)
    x = sparse_data(256, atoms, seed=4)
    first = trainer.step(x)
    assert first["aux_loss"] == 0.0  # nothing had been silent for 256 tokens before this step
    assert first["dead_fraction"] == 0.5  # ... and after it the never-firing half is
    assert (trainer.tokens_since_fired[:32] == 256).all() and (trainer.tokens_since_fired[32:] < 256).any()
    before_enc, before_dec = sae.W_enc.detach()[:32].clone(), sae.dictionary.detach()[:32].clone()
    second = trainer.step(x)
    assert second["dead_fraction"] >= 0.5 and second["aux_loss"] > 0
    assert not torch.equal(before_enc, sae.W_enc.detach()[:32])
    assert not torch.equal(before_dec, sae.dictionary.detach()[:32])
    # Without AuxK the dead half gets no gradient at all.
    sae_plain = TopKSAE(D, 64, K_TRUE)
    with torch.no_grad():
        sae_plain.latent_bias[32:] = 5.0
    plain = SAETrainer(sae_plain, lr=4e-3, dead_tokens=256, k_aux=16, aux_coef=0.0)
    plain.step(x)
    frozen_before = sae_plain.W_enc.detach()[:32].clone()
    plain.step(x)
    assert torch.equal(frozen_before, sae_plain.W_enc.detach()[:32])


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.randn(200, 4) * 0.1 + 3.0, torch.full((20, 4), 1000.0)])
    median = geometric_median(points)
    assert (median - 3.0).abs().max() < 0.2
    assert (points.mean(0) - 3.0).abs().max() > 50


def test_state_dict_round_trip():
    torch.manual_seed(3)
    sae = TopKSAE(D, 64, 4)
    trainer = SAETrainer(sae, lr=1e-3)
    x = torch.randn(64, D)
    trainer.step(x)
    state = copy.deepcopy(trainer.state_dict())  # as after torch.save + torch.load
    sae2 = TopKSAE(D, 64, 4)
    sae2.load_state_dict(sae.state_dict())
    trainer2 = SAETrainer(sae2, lr=1e-3)
    trainer2.load_state_dict(state)
    a, b = trainer.step(x), trainer2.step(x)
    assert a == b
    for p, q in zip(sae.parameters(), sae2.parameters()):
        assert torch.equal(p, q)
