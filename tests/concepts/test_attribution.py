"""Teacher hook and attribution labels against a brute-force dense reference (tiny random GPT-2 and Llama).

The reference splices a dense SAE reconstruction into the teacher at the hooked block with a straight-through
form h + recon(c) - recon(c).detach() (the forward is unchanged, the backward reaches c), takes the full
[T, C] gradient dL/dc with autograd and ranks all C latents with a stable dense sort.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_cocomix.concepts import attribution_labels, load_sae, load_teacher, sparse_attribution_scores
from megatron_cocomix.concepts.attribution import labels_from_scores
from tests.helpers.concept_files import save_tiny_gpt2, save_tiny_llama, write_openai_sae

C, K = 128, 8
LAYER = 2


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def teacher_and_sae(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save = save_tiny_gpt2 if request.param == "gpt2" else save_tiny_llama
    save(str(folder / "model"))
    teacher = load_teacher(str(folder / "model"), LAYER)
    write_openai_sae(str(folder / "sae.pt"), teacher.d_model, C, K, seed=7)
    sae = load_sae(str(folder / "sae.pt")).freeze()
    return request.param, teacher, sae


def tokens_for(teacher, b=3, t=12, seed=0):
    return torch.randint(0, teacher.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def block_of(model, kind):
    return model.transformer.h[LAYER - 1] if kind == "gpt2" else model.model.layers[LAYER - 1]


def dense_reference_scores(kind, teacher, sae, tokens, mode):
    """Full [b, t, C] scores by autograd through a dense decode spliced into the teacher."""
    model = teacher.model
    store = {}

    def hook(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        mu = h.mean(-1, keepdim=True)
        std = (h - mu).std(-1, keepdim=True)
        xn = (h - mu) / (std + 1e-5)
        pre = (xn - sae.pre_bias) @ sae.W_enc.T + sae.latent_bias
        top, idx = pre.topk(sae.k, dim=-1)
        c = torch.zeros_like(pre).scatter(-1, idx, top.clamp_min(0)).requires_grad_()
        recon = (c @ sae.W_dec.T + sae.pre_bias) * std + mu
        spliced = h + recon - recon.detach()
        store.update(c=c, pre=pre.detach(), std=std)
        return (spliced,) + tuple(output[1:]) if isinstance(output, tuple) else spliced

    handle = block_of(model, kind).register_forward_hook(hook)
    try:
        logits = model(input_ids=tokens).logits
    finally:
        handle.remove()
    loss = sum(F.cross_entropy(logits[i, :-1], tokens[i, 1:]) for i in range(tokens.shape[0]))
    (grad_c,) = torch.autograd.grad(loss, store["c"])
    # preact weighs every latent by its pre-activation (the paper: non-activated concepts score too).
    weight = store["pre"] if mode == "preact" else store["c"].detach()
    scores = grad_c * weight / store["std"]  # dL/dc carries the token's LN std; the score does not
    return scores.abs() if mode == "abs" else scores


def dense_reference_labels(scores, num_labels, mask_invalid):
    top_scores, top_ids = scores.sort(dim=-1, descending=True, stable=True)
    labels = top_ids[..., :num_labels].clone()
    if mask_invalid:
        labels[top_scores[..., :num_labels] <= 0] = -1
        labels[:, -1] = -1
    return labels


@pytest.mark.parametrize("mode", ["act", "preact", "abs"])
def test_labels_match_dense_reference(teacher_and_sae, mode):
    kind, teacher, sae = teacher_and_sae
    tokens = tokens_for(teacher)
    dense = dense_reference_scores(kind, teacher, sae, tokens, mode)
    labels = attribution_labels(teacher, sae, tokens, num_labels=4, mode=mode)
    assert labels.shape == (3, 12, 4) and labels.dtype == torch.long
    assert torch.equal(labels, dense_reference_labels(dense, 4, True))
    assert (labels[:, -1] == -1).all()
    if mode == "preact":
        # Inactive latents do win: preact is not act with another weight.
        hidden, grad, _ = teacher.hidden_and_grad(tokens)
        _, active = sae.encode(hidden)
        valid = labels >= 0
        inactive = ~(labels.unsqueeze(-1) == active.unsqueeze(-2)).any(-1) & valid
        assert inactive.any()
        return
    # The sparse scores themselves equal the dense ones at the active latents.
    hidden, grad, _ = teacher.hidden_and_grad(tokens)
    scores, indices = sparse_attribution_scores(sae, hidden, grad, mode)
    torch.testing.assert_close(scores, dense.gather(-1, indices), rtol=1e-4, atol=1e-7)


def test_preact_reference_labels_without_masking(teacher_and_sae):
    kind, teacher, sae = teacher_and_sae
    tokens = tokens_for(teacher, seed=1)
    dense = dense_reference_scores(kind, teacher, sae, tokens, "preact")
    labels = attribution_labels(teacher, sae, tokens, num_labels=6, mode="preact", mask_invalid=False)
    assert (labels >= 0).all()
    # The last position has a zero gradient: every score ties at 0 there, ids ascending as a stable sort.
    assert torch.equal(labels[:, :-1], dense_reference_labels(dense, 6, False)[:, :-1])
    assert labels[:, -1].tolist() == [[0, 1, 2, 3, 4, 5]] * 3


def test_reference_behaviour_without_masking(teacher_and_sae):
    kind, teacher, sae = teacher_and_sae
    tokens = tokens_for(teacher, seed=1)
    dense = dense_reference_scores(kind, teacher, sae, tokens, "act")
    labels = attribution_labels(teacher, sae, tokens, num_labels=6, mask_invalid=False)
    assert (labels >= 0).all()
    assert torch.equal(labels, dense_reference_labels(dense, 6, False))


def test_some_labels_are_masked_when_few_positive(teacher_and_sae):
    _, teacher, sae = teacher_and_sae
    labels = attribution_labels(teacher, sae, tokens_for(teacher, seed=2), num_labels=K)
    inner = labels[:, :-1]
    assert (inner == -1).any() and (inner >= 0).any()
    # -1 only after the valid labels: ranks are contiguous.
    valid = inner >= 0
    assert torch.equal(valid, valid.cummin(dim=-1).values)


def test_labels_do_not_depend_on_batch_mates(teacher_and_sae):
    _, teacher, sae = teacher_and_sae
    tokens = tokens_for(teacher, b=3, seed=3)
    together = attribution_labels(teacher, sae, tokens)
    for i in range(3):
        assert torch.equal(attribution_labels(teacher, sae, tokens[i:i + 1])[0], together[i])


def test_hook_is_hidden_states_of_layer(teacher_and_sae):
    kind, teacher, sae = teacher_and_sae
    tokens = tokens_for(teacher)
    with torch.no_grad():
        out = teacher.model(input_ids=tokens, output_hidden_states=True)
    torch.testing.assert_close(teacher.hidden(tokens), out.hidden_states[LAYER], rtol=0, atol=0)
    torch.testing.assert_close(teacher.logits(tokens), out.logits, rtol=0, atol=0)
    hidden, grad, loss = teacher.hidden_and_grad(tokens)
    torch.testing.assert_close(hidden, out.hidden_states[LAYER], rtol=0, atol=0)
    clean = teacher.sequence_losses(tokens)
    torch.testing.assert_close(loss, clean.sum())
    torch.testing.assert_close(teacher.sequence_losses(tokens, replace=lambda h: h), clean, rtol=0, atol=0)
    assert not torch.allclose(teacher.sequence_losses(tokens, replace=sae), clean)
    assert grad[:, -1].abs().max() == 0  # the last position predicts nothing inside the window


def test_teacher_is_frozen_and_backward_stops_at_hook(teacher_and_sae):
    kind, teacher, _ = teacher_and_sae
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training
    below_called, above_called = [], []
    blocks = teacher.model.transformer.h if kind == "gpt2" else teacher.model.model.layers
    handles = [blocks[LAYER - 2].register_full_backward_hook(lambda *a: below_called.append(1)),
               blocks[LAYER].register_full_backward_hook(lambda *a: above_called.append(1))]
    try:
        teacher.hidden_and_grad(tokens_for(teacher))
    finally:
        for handle in handles:
            handle.remove()
    assert above_called and not below_called
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_errors(teacher_and_sae, tmp_path):
    _, teacher, sae = teacher_and_sae
    with pytest.raises(ValueError, match="outside its vocabulary"):
        teacher.hidden(torch.full((1, 4), teacher.vocab_size))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_teacher(str(tmp_path / "nope"), 1)
    with pytest.raises(ValueError, match="out of range"):
        load_teacher(teacher.path, 3)
    from megatron_cocomix.concepts import TopKSAE

    wrong = TopKSAE(teacher.d_model + 8, C, K, source="wide.pt")
    with pytest.raises(ValueError, match=f"wide.pt has d_model {teacher.d_model + 8} but teacher .* layer {LAYER} "
                                         f"\\(hidden size\\) expects {teacher.d_model}"):
        attribution_labels(teacher, wrong, tokens_for(teacher))
    with pytest.raises(ValueError, match="attribution mode"):
        attribution_labels(teacher, sae, tokens_for(teacher), mode="grad")
    with pytest.raises(ValueError, match="exceeds the SAE's k"):
        attribution_labels(teacher, sae, tokens_for(teacher), num_labels=K + 1)


def test_labels_from_scores_tie_order():
    scores = torch.tensor([[[0.5, 0.0, 2.0, -1.0], [0.0, 0.0, 0.0, 0.0]]])
    indices = torch.tensor([[[7, 3, 9, 1], [5, 2, 8, 0]]])
    masked = labels_from_scores(scores, indices, 3, num_latents=10)
    assert masked.tolist() == [[[9, 7, -1], [-1, -1, -1]]]
    reference = labels_from_scores(scores, indices, 4, num_latents=10, mask_invalid=False)
    # Dense stable order: positives, then zero-score latents by id (0 and 2 are not active with non-zero score).
    assert reference.tolist() == [[[9, 7, 0, 2], [0, 1, 2, 3]]]


def test_teacher_dtype(teacher_and_sae, tmp_path):
    """--teacher-dtype: fp32 (the default) gives exactly the fp32 labels; bf16 loads and labels (CPU bf16)."""
    import argparse

    from megatron_cocomix.concepts.labeling import OnlineTeacher

    kind, teacher, sae = teacher_and_sae
    tokens = tokens_for(teacher, seed=4)
    fp32 = load_teacher(teacher.path, LAYER, dtype="fp32")
    assert fp32.dtype == torch.float32
    assert torch.equal(attribution_labels(fp32, sae, tokens), attribution_labels(teacher, sae, tokens))
    bf16 = load_teacher(teacher.path, LAYER, dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    labels = attribution_labels(bf16, sae, tokens)
    assert labels.shape == (3, 12, 4) and ((labels >= -1) & (labels < C)).all()
    with pytest.raises(ValueError, match="--teacher-dtype fp8"):
        load_teacher(teacher.path, LAYER, dtype="fp8")
    # The training step's teacher follows the flag.
    args = argparse.Namespace(teacher_model=teacher.path, teacher_layer=LAYER, teacher_dtype="bf16",
                              teacher_lm_head="chunked")
    assert OnlineTeacher(args, torch.device("cpu")).teacher.dtype == torch.bfloat16
