"""--teacher-dtype: tf32 (fp32 weights, TF32 CUDA matmuls scoped to the teacher's and the SAE's work) and the SAE
following the teacher's precision. On CPU TF32 changes no number, so the checks are that the flag is on exactly
while the teacher and the SAE compute (the same code path sets it on GPU), is restored afterwards, and that tf32
labels equal fp32 ones here."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_cocomix.arguments import TEACHER_DTYPE_CHOICES
from megatron_cocomix.concepts import attribution_labels, load_sae, load_teacher, sparse_attribution_scores
from megatron_cocomix.concepts.labeling import AttributionLabeler, OnlineTeacher
from megatron_cocomix.concepts.teacher import TEACHER_DTYPES, tf32_matmuls
from tests.helpers.concept_files import save_tiny_gpt2, write_openai_sae

LAYER, C, K = 2, 128, 8


def tf32_flag() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    write_openai_sae(str(root / "sae.pt"), 32, C, K, seed=3)
    return save_tiny_gpt2(str(root / "gpt2")), str(root / "sae.pt")


def tokens(seed=0):
    return torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(seed))


def test_tf32_matmuls_is_scoped():
    assert not tf32_flag()
    with tf32_matmuls():
        assert tf32_flag()
        with tf32_matmuls(enabled=False):
            assert tf32_flag()  # disabled: leaves the current setting alone
        with tf32_matmuls():
            assert tf32_flag()
        assert tf32_flag()  # an inner block restores what it found
    assert not tf32_flag()
    with pytest.raises(RuntimeError, match="boom"):
        with tf32_matmuls():
            raise RuntimeError("boom")
    assert not tf32_flag()


def test_choices_agree():
    assert tuple(TEACHER_DTYPES) == TEACHER_DTYPE_CHOICES
    assert TEACHER_DTYPES["tf32"] == torch.float32


def test_tf32_covers_teacher_and_sae_work(assets):
    """Inside attribution_labels the flag is on in the teacher's forward, in its backward to the hook and in the
    SAE's encode; outside, off. Labels equal the fp32 teacher's (TF32 is CPU-neutral)."""
    model_path, sae_path = assets
    tf32, fp32 = load_teacher(model_path, LAYER, dtype="tf32"), load_teacher(model_path, LAYER)
    assert tf32.tf32 and not fp32.tf32 and tf32.dtype == torch.float32
    sae = load_sae(sae_path).freeze()
    seen = {"forward": [], "backward": [], "sae": []}
    block = tf32.model.transformer.h[LAYER]  # above the hook: runs forward and backward
    handles = [block.register_forward_hook(lambda *a: seen["forward"].append(tf32_flag())),
               block.register_full_backward_hook(lambda *a: seen["backward"].append(tf32_flag()))]
    encode = sae.preactivation
    sae.preactivation = lambda xn: (seen["sae"].append(tf32_flag()), encode(xn))[1]
    try:
        for mode in ("act", "preact"):
            labels = attribution_labels(tf32, sae, tokens(), mode=mode)
            assert not tf32_flag()
            del sae.preactivation
            assert torch.equal(labels, attribution_labels(fp32, sae, tokens(), mode=mode))
            sae.preactivation = lambda xn: (seen["sae"].append(tf32_flag()), encode(xn))[1]
    finally:
        for handle in handles:
            handle.remove()
        sae.__dict__.pop("preactivation", None)
    assert seen["forward"] and all(seen["forward"]), seen
    assert seen["backward"] and all(seen["backward"]), seen
    assert seen["sae"] and all(seen["sae"]), seen
    # The KD path too.
    calls = []
    handle = block.register_forward_hook(lambda *a: calls.append(tf32_flag()))
    try:
        tf32.logits(tokens())
        fp32.logits(tokens())
    finally:
        handle.remove()
    assert calls == [True] and not tf32_flag()


@pytest.mark.parametrize("dtype", ["bf16", "tf32"])
def test_sae_follows_the_teacher(assets, dtype):
    model_path, sae_path = assets
    labeler = AttributionLabeler(model_path, LAYER, sae_path, num_labels=4, teacher_dtype=dtype,
                                 device=torch.device("cpu"))
    expected = TEACHER_DTYPES[dtype]
    assert labeler.teacher.dtype == expected and labeler.sae.dictionary.dtype == expected
    args = argparse.Namespace(teacher_model=model_path, teacher_layer=LAYER, teacher_dtype=dtype,
                              teacher_lm_head="chunked", sae=sae_path)
    online = OnlineTeacher(args, device=torch.device("cpu"))
    assert online.sae.dictionary.dtype == expected
    labels = labeler(tokens(seed=1))
    assert labels.shape == (2, 10, 4) and (labels[:, :-1, 0] >= 0).any()
    # The scores of a low-precision SAE are formed in fp32 (close scores keep their order).
    hidden, grad, _ = labeler.teacher.hidden_and_grad(tokens(seed=1))
    scores, _ = sparse_attribution_scores(labeler.sae, hidden, grad)
    assert scores.dtype == torch.float32


def test_bf16_sae_scores_close_to_fp32(assets):
    """A bf16 SAE on the same (fp32) hidden state and gradient: scores within bf16 rounding of the fp32 SAE's."""
    model_path, sae_path = assets
    teacher = load_teacher(model_path, LAYER)
    hidden, grad, _ = teacher.hidden_and_grad(tokens(seed=2))
    sae32 = load_sae(sae_path).freeze()
    sae16 = load_sae(sae_path, dtype=torch.bfloat16).freeze()
    scores32, ids32 = sparse_attribution_scores(sae32, hidden, grad)
    scores16, ids16 = sparse_attribution_scores(sae16, hidden, grad)
    same = ids16 == ids32  # the top-k of a bf16 pre-activation may swap near-ties
    assert same.float().mean() > 0.9
    scale = scores32.abs().max()
    torch.testing.assert_close(scores16[same], scores32[same], rtol=0, atol=0.05 * scale)


@pytest.mark.gpu
def test_tf32_is_scoped_on_cuda(assets):
    """On CUDA, an fp32 matmul inside tf32_matmuls rounds like TF32 and outside like IEEE fp32; a tf32 teacher's
    labels stay close to the fp32 teacher's."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(1024, 1024, device="cuda", generator=g) for _ in range(2))
    exact = (a.double() @ b.double()).float()
    outside = a @ b
    with tf32_matmuls():
        inside = a @ b
    after = a @ b
    error = lambda x: ((x - exact).norm() / exact.norm()).item()  # noqa: E731
    assert error(outside) < 1e-6 and error(after) < 1e-6 and error(inside) > 1e-5, (error(outside), error(inside))
    model_path, sae_path = assets
    sae = load_sae(sae_path, device="cuda").freeze()
    batch = tokens(seed=4).cuda()
    tf32 = attribution_labels(load_teacher(model_path, LAYER, dtype="tf32", device="cuda"), sae, batch)
    fp32 = attribution_labels(load_teacher(model_path, LAYER, device="cuda"), sae, batch)
    assert (tf32 == fp32).all(-1).float().mean() > 0.9
