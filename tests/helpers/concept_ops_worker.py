"""Checks of the CoCoMix tensor-parallel operations against dense single-tensor references, in one launch.

    PYTHONPATH=. python -m torch.distributed.run --nproc_per_node 2 tests/helpers/concept_ops_worker.py RESULT_JSON

With 2 processes (gloo) every check runs at TP1 (megatron's parallel state built with TP1, DP2) and at TP2, and the
sequence-parallel variants at TP2. Every rank draws the same full tensors from a fixed seed; a rank's inputs are
its tensor-parallel slices (over C, or over the sequence under sequence parallelism), and its results are
compared with the matching slice of the dense reference (or, for gradients that megatron sums over TP later,
the sum over TP ranks). Each check's outcome ("ok" or the error) goes to RESULT_JSON, written by rank 0.
"""

from __future__ import annotations

import json
import sys
import traceback

import torch

from megatron_cocomix import compat

compat.install()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy  # noqa: E402
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_cocomix import metrics  # noqa: E402
from megatron_cocomix.model import losses  # noqa: E402
from megatron_cocomix.model.concept_head import distributed_topk  # noqa: E402
from megatron_cocomix.model.concept_mixing import CONCEPT_METRICS, ConceptMixing, sparse_compress  # noqa: E402
from megatron_cocomix.model.losses import concept_cross_entropy, kd_kl_divergence  # noqa: E402

S, B, D, C, K, NUM_LABELS = 8, 2, 16, 32, 6, 3
TOL = dict(rtol=1e-5, atol=1e-6)


def draw(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tp():
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def shard(full, dim=-1):
    size, rank = tp()
    return full.chunk(size, dim=dim)[rank]


def tp_sum(tensor):
    out = tensor.clone()
    torch.distributed.all_reduce(out, group=parallel_state.get_tensor_model_parallel_group())
    return out


def concept_labels(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (S, B, NUM_LABELS), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.3] = -1
    return labels


# -------------------------------------------------------------------------------------------------- checks
def check_sparse_compression(sequence_parallel):
    """sparse_compress == dense masked vector @ W_comp; grads w.r.t. the kept values and W_comp."""
    z = draw(S, B, C, seed=1)
    values_full, ids = z.topk(K, dim=-1)
    weight_full = draw(C, D, seed=2)
    upstream = draw(S, B, D, seed=3)

    values_ref = values_full.clone().requires_grad_(True)
    weight_ref = weight_full.clone().requires_grad_(True)
    dense = torch.zeros(S, B, C).scatter(-1, ids, values_ref)
    reference = dense @ weight_ref
    (reference * upstream).sum().backward()

    values = values_full.clone().requires_grad_(True)
    weight = shard(weight_full, dim=0).clone().requires_grad_(True)
    out = sparse_compress(values, ids, weight, sequence_parallel)
    expected, grad_out = reference.detach(), upstream
    if sequence_parallel:
        expected, grad_out = shard(expected, dim=0), shard(upstream, dim=0)
    torch.testing.assert_close(out, expected, **TOL)
    (out * grad_out).sum().backward()
    torch.testing.assert_close(weight.grad, shard(weight_ref.grad, dim=0), **TOL)
    # Each rank's value-gradient covers the columns it owns (the rest is 0); top-k routes each back to its owner.
    torch.testing.assert_close(tp_sum(values.grad), values_ref.grad, **TOL)
    size, rank = tp()
    owned = (ids // (C // size)) == rank
    assert torch.all(values.grad[~owned] == 0), "a rank produced gradient for a column it does not own"


def check_distributed_topk(k):
    z_full = draw(S, B, C, seed=4)
    upstream = draw(S, B, k, seed=5)
    z_ref = z_full.clone().requires_grad_(True)
    ref_values, ref_ids = z_ref.topk(k, dim=-1)
    (ref_values * upstream).sum().backward()

    local = shard(z_full).clone().requires_grad_(True)
    values, ids = distributed_topk(local, k)
    torch.testing.assert_close(values, ref_values.detach(), rtol=0, atol=0)
    assert torch.equal(ids, ref_ids), "distributed top-k ids differ from the global top-k"
    (values * upstream).sum().backward()
    torch.testing.assert_close(local.grad, shard(z_ref.grad), rtol=0, atol=0)


def check_concept_cross_entropy():
    """== megatron's vocab_parallel_cross_entropy averaged over the labels, and a dense torch reference."""
    z_full = draw(S, B, C, seed=6) * 3
    labels = concept_labels(seed=7)
    valid = labels >= 0

    z_ref = z_full.clone().requires_grad_(True)
    log_probs = z_ref.log_softmax(-1)
    ref_sum = -(torch.gather(log_probs, -1, labels.clamp(min=0)) * valid).sum()
    ref_sum.backward()

    local = shard(z_full).clone().requires_grad_(True)
    ce_sum, count = concept_cross_entropy(local, labels)
    assert int(count) == int(valid.sum()), f"count {int(count)} != valid labels {int(valid.sum())}"
    torch.testing.assert_close(ce_sum, ref_sum.detach(), **TOL)
    ce_sum.backward()
    torch.testing.assert_close(local.grad, shard(z_ref.grad), **TOL)

    # megatron-core's vocab-parallel CE (in place on its input: clones), one label column at a time.
    megatron_local = shard(z_full).clone().requires_grad_(True)
    per_label = [vocab_parallel_cross_entropy(megatron_local.clone(), labels[..., j].clamp(min=0))
                 for j in range(NUM_LABELS)]
    megatron_sum = (torch.stack(per_label, dim=-1) * valid).sum()
    torch.testing.assert_close(ce_sum, megatron_sum.detach(), **TOL)
    torch.testing.assert_close((ce_sum / count).detach(), megatron_sum.detach() / valid.sum(), **TOL)
    megatron_sum.backward()
    torch.testing.assert_close(local.grad, megatron_local.grad, **TOL)


def check_kd_kl_divergence():
    """KL(teacher || student) over the (padded) vocabulary shards == dense KL; student grads."""
    vocab, padded = 20, 24  # teacher ids 0..19; the student's rows 20..23 are padding with no teacher mass
    student_full = draw(B, S, padded, seed=8) * 2
    teacher_log_probs = draw(B, S, vocab, seed=9).mul(2).log_softmax(-1)
    loss_mask = (torch.rand(B, S, generator=torch.Generator().manual_seed(10)) > 0.2).float()

    student_ref = student_full.clone().requires_grad_(True)
    log_q = student_ref.log_softmax(-1)[..., :vocab]
    kl = (teacher_log_probs.exp() * (teacher_log_probs - log_q)).sum(-1)
    ref_sum = (kl * loss_mask).sum()
    ref_sum.backward()

    for chunk_rows in (None, 3):  # one chunk of tokens, then chunks of 3 tokens (the last one shorter)
        if chunk_rows:
            losses.KD_CHUNK_ELEMENTS["cpu"] = chunk_rows * shard(student_full).shape[-1]
        local = shard(student_full).clone().requires_grad_(True)
        kl_sum, count = kd_kl_divergence(local, teacher_log_probs, loss_mask)
        assert float(count) == float(loss_mask.sum())
        torch.testing.assert_close(kl_sum, ref_sum.detach(), **TOL)
        assert kl_sum.item() > 0
        kl_sum.backward()
        torch.testing.assert_close(local.grad, shard(student_ref.grad), **TOL)


def mixing_config(sequence_parallel):
    size, _ = tp()
    return TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=2, tensor_model_parallel_size=size,
                             sequence_parallel=sequence_parallel, use_cpu_initialization=True,
                             gradient_accumulation_fusion=False)


def build_mixing(sequence_parallel, loss_weight=0.1):
    """ConceptMixing with this rank's slices of seeded full weights; returns (module, full weights)."""
    full = {"predictor.pre_bias": draw(D, seed=11) * 0.3, "predictor.linear.weight": draw(C, D, seed=12) * 0.3,
            "predictor.linear.bias": draw(C, seed=13) * 0.1, "compress_weight": draw(C, D, seed=14) * 0.3,
            "compress_bias": draw(D, seed=15) * 0.1}
    module = ConceptMixing(mixing_config(sequence_parallel), C, K, "interleave", loss_weight)
    sharded = ("predictor.linear.weight", "predictor.linear.bias", "compress_weight")
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(shard(full[name], dim=0) if name in sharded else full[name])
    return module, full


def dense_mixing(full, hidden, labels, loss_weight):
    """docs/design.md §4 on [S, B, D] with a dense masked compression: (interleaved [2S, B, D], concept loss)."""
    mu = hidden.mean(-1, keepdim=True)
    std = (hidden - mu).std(-1, keepdim=True, unbiased=True)
    xn = (hidden - mu) / (std + 1e-5)
    pre_bias = full["predictor.pre_bias"]
    z = (xn - pre_bias) @ full["predictor.linear.weight"].T + full["predictor.linear.bias"]
    values, ids = z.topk(K, dim=-1)
    dense = torch.zeros_like(z).scatter(-1, ids, values)
    concept = (dense @ full["compress_weight"] + full["compress_bias"] + pre_bias) * std + mu
    valid = labels >= 0
    loss = -(torch.gather(z.log_softmax(-1), -1, labels.clamp(min=0)) * valid).sum() / valid.sum()
    return torch.stack([hidden, concept], dim=1).reshape(2 * S, B, D), loss_weight * loss


def check_concept_mixing_module(sequence_parallel):
    """The whole ConceptMixing layer (output, concept loss, every gradient) against the dense reference."""
    metrics.reset()
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    module, full = build_mixing(sequence_parallel)
    hidden_full = draw(S, B, D, seed=16)
    labels = concept_labels(seed=17)
    upstream = draw(2 * S, B, D, seed=18)

    ref_params = {name: t.clone().requires_grad_(True) for name, t in full.items()}
    ref_hidden = hidden_full.clone().requires_grad_(True)
    ref_out, ref_loss = dense_mixing(ref_params, ref_hidden, labels, 0.1)
    ((ref_out * upstream).sum() + ref_loss).backward()

    hidden = (shard(hidden_full, dim=0) if sequence_parallel else hidden_full).clone().requires_grad_(True)
    out = module(hidden, labels)
    # Under sequence parallelism each rank interleaves its own sequence shard.
    expected = ref_out.detach().view(S, 2, B, D)
    grad_out = upstream.view(S, 2, B, D)
    if sequence_parallel:
        expected, grad_out = shard(expected, dim=0), shard(grad_out, dim=0)
    expected, grad_out = expected.reshape(-1, B, D), grad_out.reshape(-1, B, D)
    torch.testing.assert_close(out, expected, **TOL)
    (out * grad_out).sum().backward()

    reported = metrics.reduce()["concept loss"]
    assert abs(0.1 * reported - ref_loss.item()) <= 1e-5 * ref_loss.item(), (reported, ref_loss.item())
    torch.testing.assert_close(hidden.grad, shard(ref_hidden.grad, dim=0) if sequence_parallel else ref_hidden.grad,
                               **TOL)
    for name, param in module.named_parameters():
        grad = param.grad
        if getattr(param, "sequence_parallel", False):
            grad = tp_sum(grad)  # finalize_model_grads sums these over TP under sequence parallelism
        expected_grad = ref_params[name].grad
        if getattr(param, "tensor_model_parallel", False) or (tp()[0] > 1 and name.startswith("predictor.linear")):
            expected_grad = shard(expected_grad, dim=0)
        torch.testing.assert_close(grad, expected_grad, **TOL, msg=name)


def check_gradient_routes():
    """Concept loss alone: grads reach the predictor, not the compression. NTP (the mixed stream) alone: both."""
    hidden_full = draw(S, B, D, seed=19)
    labels = concept_labels(seed=20)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))

    module, _ = build_mixing(False)
    out = module(hidden_full.clone().requires_grad_(True), labels)
    (out * 0).sum().backward()  # only the concept loss attached to `out` has a non-zero gradient
    predictor_grad = module.predictor.linear.weight.grad
    assert predictor_grad is not None and predictor_grad.abs().sum() > 0, "concept loss does not reach W_pred"
    assert module.predictor.pre_bias.grad.abs().sum() > 0, "concept loss does not reach pre_bias"
    for param in (module.compress_weight, module.compress_bias):
        assert param.grad is None or torch.all(param.grad == 0), "concept loss reached the compression"

    module, _ = build_mixing(False, loss_weight=0.0)  # --no-concept-loss: no concept-loss term at all
    out = module(hidden_full.clone().requires_grad_(True), labels)
    (out * draw(2 * S, B, D, seed=21)).sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"NTP gradient does not reach {name}"

    module, _ = build_mixing(False)  # concept loss on, concepts mixed but the stream's loss reads tokens only
    out = module(hidden_full.clone().requires_grad_(True), labels)
    token_slots_only = torch.zeros(2 * S, B, D)
    token_slots_only[0::2] = 1
    (out * token_slots_only).sum().backward()
    for param in (module.compress_weight, module.compress_bias):
        assert param.grad is None or torch.all(param.grad == 0), "compression got gradient from token slots"


def run_all(results, size):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=size)
    metrics.declare(*CONCEPT_METRICS)
    checks = {
        "sparse_compression": lambda: check_sparse_compression(False),
        "distributed_topk": lambda: check_distributed_topk(K),
        "distributed_topk_k_above_shard": lambda: check_distributed_topk(C // 2 + 4),
        "concept_cross_entropy": check_concept_cross_entropy,
        "kd_kl_divergence": check_kd_kl_divergence,
        "concept_mixing_module": lambda: check_concept_mixing_module(False),
        "gradient_routes": check_gradient_routes,
    }
    if size > 1:
        checks["sparse_compression_sp"] = lambda: check_sparse_compression(True)
        checks["concept_mixing_module_sp"] = lambda: check_concept_mixing_module(True)
    for name, check in checks.items():
        key = f"tp{size}/{name}"
        try:
            check()
            results[key] = "ok"
        except Exception:  # record and go on: every check gets a verdict
            results[key] = traceback.format_exc(limit=4)
        # Ranks must agree before the next check's collectives; a failed check may have left one behind.
        torch.distributed.barrier()
    parallel_state.destroy_model_parallel()


def main():
    torch.distributed.init_process_group("gloo")
    results = {}
    for size in sorted({1, torch.distributed.get_world_size()}):
        run_all(results, size)
    # A check passes only when it passed on every rank.
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if torch.distributed.get_rank() == 0:
        merged = {key: next((r[key] for r in gathered if r[key] != "ok"), "ok") for key in results}
        with open(sys.argv[1], "w") as f:
            json.dump(merged, f, indent=1)
        for key, verdict in merged.items():
            print(f"{key}: {verdict if verdict == 'ok' else 'FAILED'}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
