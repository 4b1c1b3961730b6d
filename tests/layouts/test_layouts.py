"""The layout table: each parallel layout trains the tiny GPT from scratch and must reproduce the single-process
run on the same data and seed (losses to 1e-5 relative, dropout off). Initialisation is layout-independent, so
no checkpoint is shared between the runs: this also tests that the same --seed gives the same model. All 4 optimizer
steps have a non-zero learning rate; the final validation follows the 4th."""

import pytest

from tests.helpers.launch import (
    TINY_GPT,
    assert_close,
    assert_real_updates,
    losses,
    run_pretrain,
    update_learning_rates,
)

LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2_vpp2": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    "dp2_ddp": (2, []),
    "dp2_distributed_optimizer": (2, ["--use-distributed-optimizer"]),
    "tp2_pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "recompute_full": (1, ["--recompute-granularity", "full"]),
    "recompute_full_block": (1, ["--recompute-granularity", "full", "--recompute-method", "block",
                                 "--recompute-num-layers", "2"]),
    "recompute_selective": (1, ["--recompute-granularity", "selective"]),
    "attention_local": (1, ["--attention-backend", "local"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    result = run_pretrain(TINY_GPT, tmp_path_factory.mktemp("reference"), nproc=1)
    assert_real_updates(update_learning_rates(result, TINY_GPT), what="reference")
    return result


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    nproc, flags = LAYOUTS[layout]
    result = run_pretrain(TINY_GPT + flags, tmp_path, nproc=nproc)
    assert result["iteration"] == 4
    assert_real_updates(update_learning_rates(result, TINY_GPT + flags), what=layout)
    assert_close(losses(result), losses(reference), rtol=1e-5, what=f"{layout} train lm loss")
    assert_close([result["valid"]["lm loss"]], [reference["valid"]["lm loss"]], rtol=1e-5,
                 what=f"{layout} validation lm loss")


MODERN_GPT = TINY_GPT + ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
                         "--untie-embeddings-and-output-weights", "--group-query-attention",
                         "--num-query-groups", "2", "--disable-bias-linear"]


@pytest.fixture(scope="module")
def modern_reference(tmp_path_factory):
    return run_pretrain(MODERN_GPT, tmp_path_factory.mktemp("modern"), nproc=1)


@pytest.mark.parametrize("flags", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                   ["--pipeline-model-parallel-size", "2"]], ids=["tp2_sp", "pp2"])
def test_llama_style_layout_matches_single_process(flags, modern_reference, tmp_path):
    """SwiGLU (fused gate/up sliced per TP rank), RMSNorm, RoPE, GQA, untied output layer."""
    result = run_pretrain(MODERN_GPT + flags, tmp_path, nproc=2)
    assert_real_updates(update_learning_rates(result, MODERN_GPT), what="llama-style")
    assert_close(losses(result), losses(modern_reference), rtol=1e-5, what="llama-style lm loss")
    assert_close([result["valid"]["lm loss"]], [modern_reference["valid"]["lm loss"]], rtol=1e-5,
                 what="llama-style validation lm loss")


def test_losses_fall_and_log_line_is_megatron_format(reference):
    history = losses(reference)
    assert history[-1] < history[0]
    line = next(text for text in reference["stdout"].splitlines() if "iteration        4/       4" in text)
    for field in ("consumed samples:           32", "elapsed time per iteration (ms):", "learning rate:",
                  "global batch size:     8", "lm loss: ", "grad norm:", "number of skipped iterations:"):
        assert field in line, (field, line)
    # 7 significant digits, Megatron's `{:.6E}`.
    value = line.split("lm loss: ")[1].split(" |")[0]
    assert len(value.split("E")[0].replace(".", "")) == 7 and float(value) == pytest.approx(history[-1], rel=1e-6)
