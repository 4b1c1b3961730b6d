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


def test_nonfinite_grad_norm_stops_before_the_update(single_process):
    """--check-for-nan-in-loss-and-grad: a NaN in one gradient makes the global norm NaN; the back end raises
    between computing the norm and applying the update, naming the rank that holds it."""
    import torch

    from megatron_cocomix.training.exit_conditions import NonFiniteError

    backend = _backend([])
    backend.zero_grad()
    params = [p for chunk in backend.model for p in chunk.parameters()]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.main_grad.normal_()
    params[3].main_grad.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError) as caught:
        backend.step()
    assert caught.value.quantity == "grad norm" and caught.value.rank == 0
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    # Finite gradients go through, clipped, and change the weights (past the warmup's zero learning rate).
    backend.scheduler.step(increment=1)
    backend.zero_grad()
    for p in params:
        p.main_grad.normal_()
    applied, norm = backend.step()
    assert applied and norm > 1.0 and not all(torch.equal(p, b) for p, b in zip(params, before))
