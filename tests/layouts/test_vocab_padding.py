"""Layout-invariant vocabulary padding with GPT-2's vocabulary (50257 ids).

The padded vocabulary depends on TP (50304 rows at TP1, 50432 at TP2, 50688 at TP4), but the padded logits are
masked out of every softmax and the padded rows start at zero, so the same seed and data give the same losses at
every layout, and a checkpoint saved at TP2 resumes at TP1 and TP4 (weights and optimizer state re-padded) with
the TP2 run's own next losses."""

import json

import pytest

from tests.helpers.launch import (
    MULTI_RUN_WORKER,
    TINY_GPT,
    assert_close,
    assert_real_updates,
    losses,
    run_script,
    update_learning_rates,
)

RTOL = 1e-5


def gpt2_vocab(*extra) -> list:
    """TINY_GPT with 50256 mock ids + EOD = GPT-2's 50257, saving at iteration 2 where asked."""
    flags = list(TINY_GPT)
    flags[flags.index("--vocab-size") + 1] = "50256"
    return flags + list(extra)


def run_many(tmp_path, runs, nproc):
    spec, out = tmp_path / f"runs{nproc}.json", tmp_path / f"summaries{nproc}.json"
    spec.write_text(json.dumps(runs))
    run_script(MULTI_RUN_WORKER, [str(spec), str(out)], nproc=nproc, timeout=900)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_padding")
    ckpt = tmp / "tp2_ckpt"
    two = run_many(tmp, [["tp2", "pretrain", gpt2_vocab("--tensor-model-parallel-size", "2", "--save", str(ckpt),
                                                        "--save-interval", "2")]], nproc=2)
    # Resume from the TP2 checkpoint of iteration 2 (the run also saved iteration 4).
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    one = run_many(tmp, [["tp1", "pretrain", gpt2_vocab()],
                         ["tp1_from_tp2", "pretrain", gpt2_vocab("--load", str(ckpt))]], nproc=1)
    four = run_many(tmp, [["tp2_pp2", "pretrain", gpt2_vocab("--tensor-model-parallel-size", "2",
                                                             "--pipeline-model-parallel-size", "2")],
                          ["tp4", "pretrain", gpt2_vocab("--tensor-model-parallel-size", "4")],
                          ["tp4_from_tp2", "pretrain", gpt2_vocab("--tensor-model-parallel-size", "4",
                                                                  "--load", str(ckpt))]], nproc=4)
    return {**two, **one, **four}


@pytest.mark.parametrize("layout", ["tp2", "tp2_pp2", "tp4"])
def test_same_losses_at_every_padding(runs, layout):
    assert_real_updates(update_learning_rates(runs[layout], gpt2_vocab()), what=layout)
    assert_close(losses(runs[layout]), losses(runs["tp1"]), rtol=RTOL, what=f"{layout} vs TP1")
    assert_close([runs[layout]["valid"]["lm loss"]], [runs["tp1"]["valid"]["lm loss"]], rtol=RTOL,
                 what=f"{layout} validation")


@pytest.mark.parametrize("layout", ["tp1_from_tp2", "tp4_from_tp2"])
def test_tp2_checkpoint_resumes_at_another_padding(runs, layout):
    resumed = runs[layout]
    assert [e["iteration"] for e in resumed["train_history"]] == [3, 4]
    assert_real_updates(update_learning_rates(runs["tp2"], gpt2_vocab())[:2]
                        + update_learning_rates(resumed, gpt2_vocab(), resumed_from=runs["tp2"]), what=layout)
    assert_close(losses(resumed), losses(runs["tp2"])[2:], rtol=RTOL, what=f"{layout} iterations 3-4")
    assert_close([resumed["valid"]["lm loss"]], [runs["tp2"]["valid"]["lm loss"]], rtol=RTOL,
                 what=f"{layout} validation after iteration 4")
