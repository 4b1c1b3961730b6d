"""CoCoMix checkpoints: the concept layer's tensors (predictor and compression sharded over C, biases
replicated) save at TP2 and load at TP1 with the same validation losses, and a resumed run continues the
uninterrupted one."""

import os

from tests.helpers.cocomix_assets import cocomix_flags
from tests.helpers.launch import (
    TINY_GPT,
    assert_close,
    assert_real_updates,
    losses,
    run_pretrain,
    update_learning_rates,
)


def test_tp2_cocomix_checkpoint_loads_at_tp1_and_resumes(tmp_path):
    flags = TINY_GPT + cocomix_flags(concept_layer=2, topk=4)
    save = str(tmp_path / "checkpoints")
    tp2 = run_pretrain(flags + ["--tensor-model-parallel-size", "2", "--save", save, "--save-interval", "2"],
                       tmp_path, nproc=2, name="tp2")
    assert os.path.isdir(os.path.join(save, "iter_0000004"))
    # The last checkpoint (iteration 4) at TP1: the same final validation lm and concept losses.
    at_tp1 = run_pretrain(flags + ["--load", save, "--finetune", "--skip-train"], tmp_path, name="tp1")
    for key in ("lm loss", "concept loss"):
        assert_close([at_tp1["valid"][key]], [tp2["valid"][key]], rtol=1e-5, what=f"TP2 -> TP1 validation {key}")
    # Resume from iteration 2 at TP1 (the optimizer state reshards too): iterations 3-4 as the TP2 run.
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("2")
    resumed = run_pretrain(flags + ["--load", save], tmp_path, name="resumed")
    assert [h["iteration"] for h in resumed["train_history"]] == [3, 4]
    # Steps 1-2 at TP2, 3-4 resumed at TP1: four real updates, the last one seen by the validation.
    assert_real_updates(update_learning_rates(tp2, flags)[:2] + update_learning_rates(resumed, flags, resumed_from=tp2))
    for key in ("lm loss", "concept loss"):
        assert_close(losses(resumed, key), losses(tp2, key)[2:], rtol=1e-5, what=f"resumed {key}")
        assert_close([resumed["valid"][key]], [tp2["valid"][key]], rtol=1e-5, what=f"resumed validation {key}")
