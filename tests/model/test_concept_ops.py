"""CoCoMix operations: tensor-parallel ones against dense references (one 2-process launch), slot helpers here.

tests/helpers/concept_ops_worker.py runs, at TP1 and TP2 (and with sequence parallelism at TP2):
sparse compression == dense masked matmul (values, grads w.r.t. values and W_comp); distributed top-k == global
top-k (values, ids, grads); concept cross-entropy == megatron's vocab_parallel_cross_entropy averaged over the
labels and a dense reference (-1 ignored, grads); KD KL == dense KL (value, grads); the whole ConceptMixing layer
== the dense docs/design.md §4 layer (output, concept loss, every gradient); gradient routes (the concept loss reaches
the predictor, never the compression; the mixed stream reaches both).
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_cocomix.model.concept_mixing import (
    concept_slots,
    interleave,
    mask_for_slots,
    rotary_for_slots,
)
from tests.helpers.launch import CONCEPT_OPS_WORKER, run_script

CHECKS = ["sparse_compression", "distributed_topk", "distributed_topk_k_above_shard", "concept_cross_entropy",
          "kd_kl_divergence", "concept_mixing_module", "gradient_routes"]
CASES = [f"tp1/{c}" for c in CHECKS] + [f"tp2/{c}" for c in CHECKS] + [
    "tp2/sparse_compression_sp", "tp2/concept_mixing_module_sp"]


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    out = tmp_path_factory.mktemp("concept_ops") / "verdicts.json"
    run_script(CONCEPT_OPS_WORKER, [str(out)], nproc=2, timeout=300)
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_concept_op(verdicts, case):
    assert case in verdicts, f"{case} did not run"
    assert verdicts[case] == "ok", verdicts[case]


def test_interleave_and_concept_slots():
    tokens = torch.arange(12.0).view(3, 2, 2)        # [s, b, d]
    concepts = -torch.arange(12.0).view(3, 2, 2)
    mixed = interleave(tokens, concepts)
    assert mixed.shape == (6, 2, 2)
    for i in range(3):
        assert torch.equal(mixed[2 * i], tokens[i]) and torch.equal(mixed[2 * i + 1], concepts[i])
    assert torch.equal(concept_slots(mixed), concepts)


def _doc_mask(boundaries, s):
    """Megatron mask (True = masked) [1, 1, s, s]: causal within documents starting at `boundaries`."""
    doc = torch.zeros(s, dtype=torch.long)
    for start in boundaries:
        doc[start:] += 1
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    return (~allowed)[None, None]


@pytest.mark.parametrize("boundaries", [[], [3], [2, 5]])
def test_mask_for_slots(boundaries):
    s = 7
    mask = _doc_mask(boundaries, s)
    doubled = mask_for_slots(mask)
    assert doubled.shape == (1, 1, 2 * s, 2 * s)
    for i in range(2 * s):
        for j in range(2 * s):
            # slot j is visible from slot i iff j <= i and their tokens may attend (same document, causal).
            visible = j <= i and not bool(mask[0, 0, i // 2, j // 2])
            assert bool(doubled[0, 0, i, j]) == (not visible), (i, j)
    if not boundaries:
        assert torch.equal(doubled[0, 0], torch.ones(2 * s, 2 * s, dtype=torch.bool).triu(1))


def test_rotary_for_slots():
    table = torch.randn(10, 1, 1, 8)  # megatron's rotary table [max positions, 1, 1, dim]
    slots = rotary_for_slots(table, 6)
    assert slots.shape == (12, 1, 1, 8)
    for i in range(12):
        assert torch.equal(slots[i], table[i // 2]), f"slot {i} should take token {i // 2}'s position"
