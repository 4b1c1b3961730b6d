"""Optimizer back ends (training/backends/): which parameters are weight-decayed.

Megatron-LM leaves biases and 1-D parameters (norm weights) undecayed; --weight-decay-all-params decays every
parameter, as the official CoCoMix recipe does (AdamW over model.parameters()). Checked on the optimizer each
back end actually builds, in one process."""

import json

import pytest

from tests.helpers.launch import TINY_GPT


def _backend(flags):
    """The optimizer back end the flags choose, over a freshly built TINY_GPT."""
    from megatron.core.utils import get_model_config

    import pretrain_cocomix
    from megatron_cocomix.arguments import parse_args
    from megatron_cocomix.data.tokenizer import build_tokenizer
    from megatron_cocomix.distributed import initialize_distributed
    from megatron_cocomix.global_vars import set_args, set_tokenizer
    from megatron_cocomix.training.backends import build_optimizer_backend
    from megatron_cocomix.training.loop import get_model

    args = parse_args(TINY_GPT + ["--weight-decay", "0.1"] + list(flags))
    set_tokenizer(build_tokenizer(args))
    set_args(args)
    initialize_distributed(args)
    model = get_model(pretrain_cocomix.model_provider, args)
    return build_optimizer_backend(args, model, get_model_config(model[0]))


def _decay_by_name(flags):
    """{parameter name: weight decay its optimizer group applies at the scheduled value}."""
    backend = _backend(flags)
    backend.scheduler.step(increment=1)  # megatron's scheduler writes weight_decay = wd x wd_mult per group
    names = {id(p): n for chunk in backend.model for n, p in chunk.named_parameters()}
    out = {}
    for group in backend.optimizer.param_groups:
        for param in group["params"]:
            out[names.get(id(param), f"<partition of {tuple(param.shape)}>")] = group["weight_decay"]
    return out


def _check(decay, everything):
    assert decay, "no parameters"
    biases_and_norms = {n: v for n, v in decay.items() if n.endswith("bias") or "norm" in n}
    matrices = {n: v for n, v in decay.items() if n not in biases_and_norms}
    assert biases_and_norms and matrices
    assert all(v == pytest.approx(0.1) for v in matrices.values()), matrices
    expected = 0.1 if everything else 0.0
    assert all(v == pytest.approx(expected) for v in biases_and_norms.values()), biases_and_norms


@pytest.mark.parametrize("everything", [False, True])
def test_megatron_backend_weight_decay_groups(single_process, everything):
    _check(_decay_by_name(["--weight-decay-all-params"] if everything else []), everything)


def test_deepspeed_param_groups(single_process, tmp_path):
    from megatron_cocomix.training.backends.deepspeed import param_groups

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    import pretrain_cocomix
    from megatron_cocomix.arguments import parse_args
    from megatron_cocomix.data.tokenizer import build_tokenizer
    from megatron_cocomix.global_vars import set_args, set_tokenizer

    args = parse_args(TINY_GPT + ["--deepspeed", "--deepspeed_config", str(config)])
    set_tokenizer(build_tokenizer(args))
    set_args(args)
    model = pretrain_cocomix.model_provider(pre_process=True, post_process=True)
    names = {id(p): n for n, p in model.named_parameters()}
    for everything in (False, True):
        decay = {names[id(p)]: g["weight_decay"] for g in param_groups(model, 0.1, everything) for p in g["params"]}
        assert set(decay) == set(names.values())
        _check(decay, everything)


@pytest.mark.parametrize("everything", [False, True])
def test_deepspeed_backend_weight_decay_groups(single_process, tmp_path, everything):
    """The ZeRO optimizer DeepSpeed builds holds flat fp32 partitions: one group per decay setting."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    decay = _decay_by_name(["--deepspeed", "--deepspeed_config", str(config)]
                           + (["--weight-decay-all-params"] if everything else []))
    assert sorted(set(decay.values())) == ([0.1] if everything else [0.0, 0.1])


def _fill_grads(backend, seed, nan_at=None):
    import torch

    generator = torch.Generator().manual_seed(seed)
    params = [p for chunk in backend.model for p in chunk.parameters()]
    for p in params:
        p.main_grad.copy_(torch.randn(p.main_grad.shape, generator=generator))
    if nan_at is not None:
        params[nan_at].main_grad.view(-1)[0] = float("nan")
    return params


def test_nonfinite_grad_norm_skips_the_update_on_the_device(single_process):
    """--check-for-nan-in-loss-and-grad: a NaN in one gradient makes the global norm NaN; the update is skipped on
    the device (fused Adam's found_inf), and the guard, read at the loop's next sync, names the iteration, the
    rank holding it and the quantity."""
    import math

    import torch

    from megatron_cocomix.training.exit_conditions import DivergenceGuard, NonFiniteError

    backend = _backend([])
    backend.scheduler.step(increment=1)  # a non-zero learning rate, whatever the warmup (which starts at 0)
    backend.zero_grad()
    params = _fill_grads(backend, 0, nan_at=3)
    before = [p.detach().clone() for p in params]
    guard = DivergenceGuard()
    guard.observe_losses(7, {"lm loss": torch.tensor([6.0, 2.0])})
    applied, norm = backend.step(guard)
    assert torch.is_tensor(norm) and math.isnan(float(norm))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    state = [s for inner in backend._inner_optimizers() for s in inner.state.values()]
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in state)  # the moments did not move
    with pytest.raises(NonFiniteError) as caught:
        guard.check()
    assert (caught.value.quantity, caught.value.rank, caught.value.iteration) == ("grad norm", 0, 7)
    # Finite gradients go through, clipped, and change the weights.
    backend.zero_grad()
    _fill_grads(backend, 1)
    guard = DivergenceGuard()
    guard.observe_losses(8, {"lm loss": torch.tensor([6.0, 2.0])})
    applied, norm = backend.step(guard)
    guard.check()
    assert applied and float(norm) > 1.0 and not all(torch.equal(p, b) for p, b in zip(params, before))


def test_nonfinite_loss_skips_the_update_and_names_the_loss(single_process):
    import torch

    from megatron_cocomix.training.exit_conditions import DivergenceGuard, NonFiniteError

    backend = _backend([])
    backend.scheduler.step(increment=1)
    backend.zero_grad()
    params = _fill_grads(backend, 0)
    before = [p.detach().clone() for p in params]
    guard = DivergenceGuard()
    for iteration, loss in ((3, 2.0), (4, float("inf")), (5, float("nan"))):
        guard.observe_losses(iteration, {"lm loss": torch.tensor([loss, 1.0]), "concept loss": torch.tensor([1., 1.])})
    backend.step(guard)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(NonFiniteError) as caught:
        guard.check()
    assert (caught.value.quantity, caught.value.value, caught.value.iteration) == ("lm loss", float("inf"), 4)


def _per_tensor_copy(this, that, overflow_buf=None):
    """megatron-core's master -> model copy without apex / TE (its bf16 branch): one copy_ per tensor."""
    for source, target in zip(this, that):
        target.copy_(source)


@pytest.mark.parametrize("flags", [[], ["--bf16"], ["--bf16", "--use-distributed-optimizer"]],
                         ids=["fp32", "bf16", "bf16-distributed"])
def test_fused_adam_and_device_norm_equal_megatrons_fallback(single_process, monkeypatch, flags):
    """The back end's step (fused AdamW, norm and clipping on the device, foreach master-weight copies) against
    megatron-core's own `optimizer.step()` without apex / TE (foreach AdamW, host-read norm, per-tensor copies),
    from the same weights and gradients, over steps that clip and steps that do not."""
    import torch
    from megatron.core.optimizer import optimizer as megatron_optimizer

    ours, reference = (_backend(flags + ["--clip-grad", "40.0"]) for _ in range(2))
    assert all(group["fused"] for inner in ours._inner_optimizers() for group in inner.param_groups)
    for inner in reference._inner_optimizers():
        for group in inner.param_groups:
            group.update(fused=None, foreach=True)
    clipped = []
    for step in range(4):
        for backend in (ours, reference):
            backend.zero_grad()
            params = _fill_grads(backend, step)
            if step % 2:  # small gradients: no clipping
                for p in params:
                    p.main_grad.mul_(1e-3)
        applied, our_norm = ours.step()
        with monkeypatch.context() as patch:
            patch.setattr(megatron_optimizer, "_multi_tensor_copy_this_to_that", _per_tensor_copy)
            reference_applied, reference_norm, _ = reference.optimizer.step()
        reference.scheduler.step(increment=1)
        assert applied and reference_applied
        assert float(our_norm) == pytest.approx(reference_norm, rel=1e-6)
        clipped.append(reference_norm > 40.0)
        # fp32 master weights to fp32 rounding; the bf16 model weights may then round one ulp apart.
        masters = [[p for inner in b._inner_optimizers() for g in inner.param_groups for p in g["params"]]
                   for b in (ours, reference)]
        for a, b in zip(*masters):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        model_rtol = 1e-5 if not flags else 2 ** -7
        for a, b in zip((p for c in ours.model for p in c.parameters()),
                        (p for c in reference.model for p in c.parameters())):
            torch.testing.assert_close(a, b, rtol=model_rtol, atol=1e-6)
    assert clipped == [True, False, True, False]
