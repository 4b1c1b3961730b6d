"""No host synchronisation inside a training step (training/host_syncs.py counts, on CPU, the calls that would make
the host wait for a GPU), for NTP, CoCoMix with online and precomputed labels, and KD, in bf16 and fp32.

Each run trains 5 iterations in one process with nothing logged, validated or saved before the end; the count of
host waits is read after every iteration. The first iteration may pay one-off costs (the teacher is loaded there);
every later iteration must add none. The end of training reads the logged values and the divergence guard: a
fixed number of reads, however many iterations ran."""

import pytest
import torch

from megatron_cocomix.training.host_syncs import HostSyncCounter
from tests.helpers.cocomix_assets import cocomix_flags
from tests.helpers.launch import TINY_GPT

STEPS = ["--train-iters", "5", "--log-interval", "100", "--eval-iters", "0", "--global-batch-size", "4"]


def _syncs_per_iteration(argv, monkeypatch):
    """Host waits added by each iteration (the step, its log call and the exit-condition check), and the counter."""
    from megatron.core import parallel_state

    import pretrain_cocomix
    from megatron_cocomix.training import loop
    from megatron_cocomix.training.logging import TrainingLogger

    counter, after_iteration = HostSyncCounter(), []
    original_train, original_log = loop.train, TrainingLogger.training_log

    def counted_train(*args, **kwargs):
        with counter:
            return original_train(*args, **kwargs)

    def counted_log(self, iteration, *args, **kwargs):
        original_log(self, iteration, *args, **kwargs)
        after_iteration.append(counter.count)

    monkeypatch.setattr(loop, "train", counted_train)
    monkeypatch.setattr(TrainingLogger, "training_log", counted_log)
    try:
        summary = pretrain_cocomix.main(list(argv))
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    assert summary["iteration"] == 5
    return [b - a for a, b in zip(after_iteration, after_iteration[1:])], counter


def _assert_no_syncs(argv, monkeypatch):
    per_iteration, counter = _syncs_per_iteration(argv, monkeypatch)
    assert per_iteration == [0, 0, 0, 0], counter.report()
    return counter


@pytest.mark.parametrize("precision", [["--bf16"], []], ids=["bf16", "fp32"])
def test_ntp_step_never_waits_for_the_device(single_process, monkeypatch, precision):
    counter = _assert_no_syncs(TINY_GPT + STEPS + precision, monkeypatch)
    assert 0 < counter.count <= 4, counter.report()  # the end of training reads the logs and the guard


def test_cocomix_online_step_never_waits_for_the_device(single_process, monkeypatch):
    _assert_no_syncs(TINY_GPT + STEPS + ["--bf16"] + cocomix_flags(), monkeypatch)


def test_cocomix_precomputed_and_kd_steps_never_wait_for_the_device(single_process, monkeypatch, tmp_path):
    from tools import extract_concepts

    prefix = str(tmp_path / "labels")
    assert extract_concepts.main(TINY_GPT + STEPS + cocomix_flags() + ["--output-prefix", prefix,
                                                                     "--no-tokenizer-check"]) == 0
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    concept_flags = cocomix_flags()
    precomputed = concept_flags[:concept_flags.index("--teacher-model")] + ["--concept-labels", prefix]
    _assert_no_syncs(TINY_GPT + STEPS + ["--bf16"] + precomputed, monkeypatch)
    teacher = concept_flags[concept_flags.index("--teacher-model"):concept_flags.index("--teacher-layer")]
    _assert_no_syncs(TINY_GPT + STEPS + ["--bf16", "--kd"] + teacher, monkeypatch)


def test_the_counter_sees_each_kind_of_host_wait():
    x = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        y = (x * 2).sum()
        torch.nn.functional.softmax(x, dim=0)
    assert syncs.count == 0 and syncs.ops["sum"] == 1
    with HostSyncCounter() as syncs:
        float(y)
        bool(x[0] > 1)
        x[x > 2]
        torch.nonzero(x)
        x.tolist()
        x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]))
    assert syncs.count == 6, syncs.report()
    assert all(site.endswith(".py:" + site.rsplit(":", 1)[1]) and "test_host_syncs" in site
               for _, site in syncs.sites), syncs.report()
