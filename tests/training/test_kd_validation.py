"""A KD student's validation runs the student alone: its `lm loss`, the number that compares with the NTP and
CoCoMix students, with no teacher forward per validation batch (docs/design.md §6, KD loss)."""

import math

from megatron_cocomix.concepts import labeling
from tests.helpers.cocomix_assets import cocomix_flags
from tests.helpers.in_process import train_in_process
from tests.helpers.launch import TINY_GPT

ITERS, EVAL_ITERS = 2, 3


def test_kd_validation_reports_the_lm_loss_without_the_teacher(single_process, monkeypatch):
    concept_flags = cocomix_flags()
    teacher = concept_flags[concept_flags.index("--teacher-model"):concept_flags.index("--teacher-layer")]
    calls = []
    original = labeling.OnlineTeacher.log_probs

    def counted(self, tokens):
        calls.append(tokens.shape[0])
        return original(self, tokens)

    monkeypatch.setattr(labeling.OnlineTeacher, "log_probs", counted)
    summary = train_in_process(TINY_GPT + ["--kd", *teacher, "--train-iters", str(ITERS), "--eval-interval",
                                           str(ITERS), "--eval-iters", str(EVAL_ITERS), "--log-interval", "1"])
    # One teacher call per training micro-batch (TINY_GPT: global batch 8 in micro-batches of 2), none for the
    # validation at the end.
    assert len(calls) == ITERS * 4, calls
    assert set(summary["valid"]) == {"lm loss"} and math.isfinite(summary["valid"]["lm loss"])
    assert all("kd loss" in step for step in summary["train_history"])
