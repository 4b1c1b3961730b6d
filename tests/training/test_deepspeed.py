"""DeepSpeed ZeRO back end against megatron-core's own optimizer.

Every run trains the tiny GPT from scratch (layout-independent initialisation, dropout off, --clip-grad 1.0)
and must reproduce the single-process megatron-optimizer run: per-iteration losses, gradient norms (which are
above the clip threshold, so the clipped update is tested too), learning rates and the final validation loss,
to 1e-5 relative. TINY_GPT has --global-batch-size 8 and --micro-batch-size 2, so each data-parallel rank runs
2 (DP2) or 4 (DP1) micro-batches per step: ZeRO-2/3 must reduce between micro-batches.

The configuration checks (batch sizes, precision, clipping, refused layouts) call the validation directly.
"""

import json
import os
import re

import pytest

from tests.helpers.launch import (
    TINY_GPT,
    assert_close,
    assert_real_updates,
    losses,
    run_pretrain,
    run_script,
    update_learning_rates,
)
from tests.helpers.paths import ROOT

CLIP = 1.0


def write_ds_config(directory, name: str, config: dict) -> str:
    path = os.path.join(str(directory), f"{name}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    result = run_pretrain(TINY_GPT + ["--clip-grad", str(CLIP)], tmp_path_factory.mktemp("ds_reference"), nproc=1)
    norms = losses(result, "grad_norm")
    # The comparison below only tests clipping if the reference actually clips, and the 4 updates if they move.
    assert all(n > CLIP for n in norms), norms
    assert_real_updates(update_learning_rates(result, TINY_GPT), what="reference")
    return result


# name: (processes, zero_optimization section, layout flags)
CASES = {
    "dp2_zero1": (2, {"stage": 1}, []),
    # DP1, 4 micro-batches through the 1F1B schedule; the tied embedding lives on both pipeline stages.
    "tp2_pp2_zero1": (4, {"stage": 1}, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    # Parameters partitioned over DP2 inside each TP rank; sequence-parallel norm gradients summed over TP
    # before DeepSpeed reduces them; small buckets so that several reduce-scatters overlap one backward.
    "tp2_dp2_sp_zero3": (4, {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 5000,
                             "stage3_prefetch_bucket_size": 5000, "stage3_param_persistence_threshold": 100},
                         ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_zero_matches_megatron_optimizer(case, reference, tmp_path):
    nproc, zero, flags = CASES[case]
    ds_config = write_ds_config(tmp_path, case, {"zero_optimization": zero})
    result = run_pretrain(TINY_GPT + flags + ["--clip-grad", str(CLIP), "--deepspeed", "--deepspeed_config",
                                              ds_config], tmp_path, nproc=nproc)
    assert result["iteration"] == 4
    assert_close(losses(result), losses(reference), rtol=1e-5, what=f"{case} lm loss")
    assert_close(losses(result, "grad_norm"), losses(reference, "grad_norm"), rtol=1e-5, what=f"{case} grad norm")
    assert_close(losses(result, "lr"), losses(reference, "lr"), rtol=1e-12, what=f"{case} learning rate")
    assert_real_updates(update_learning_rates(result, TINY_GPT), what=case)
    assert_close([result["valid"]["lm loss"]], [reference["valid"]["lm loss"]], rtol=1e-5,
                 what=f"{case} validation lm loss")


def test_deepspeed_launcher_zero2(reference, tmp_path):
    """`deepspeed --num_gpus 2 pretrain_cocomix.py ...` (the launcher passes --local_rank; CPU ranks on gloo):
    DP2 ZeRO-2 with overlapping bucketed reduce-scatter, losses read from Megatron's log line."""
    ds_config = write_ds_config(tmp_path, "zero2", {
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 5000},
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "gradient_clipping": CLIP})
    proc = run_script(os.path.join(ROOT, "pretrain_cocomix.py"),
                      TINY_GPT + ["--clip-grad", str(CLIP), "--deepspeed", "--deepspeed_config", ds_config],
                      nproc=2, launcher="deepspeed")
    logged = [float(v) for v in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", proc.stdout)]
    # Megatron prints 7 significant digits.
    assert_close(logged, losses(reference), rtol=2e-6, what="deepspeed launcher ZeRO-2 lm loss")


# Configuration checks: no launch.

def _args(extra=(), world_size=2, config=None):
    import json
    import tempfile

    from megatron_cocomix.arguments import parse_args

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ds_config.json")
        with open(path, "w") as f:
            json.dump(config or {"zero_optimization": {"stage": 1}}, f)
        return parse_args(TINY_GPT + ["--deepspeed", "--deepspeed_config", path, *extra], world_size=world_size)


def test_parse_args_refuses_a_mismatched_config_in_one_line():
    """The check runs while the flags are validated, before any process group starts."""
    from megatron_cocomix.arguments import ArgumentError

    with pytest.raises(ArgumentError, match=r"ds_config.json: train_batch_size 16 != --global-batch-size 8$"):
        _args(config={"train_batch_size": 16})


def _check(config, extra=(), world_size=2):
    from megatron_cocomix.deepspeed_config import check_deepspeed_config

    return check_deepspeed_config(_args(extra, world_size), config, "/configs/ds_config.json")


def test_config_missing_batch_keys_are_filled_from_flags():
    filled = _check({"zero_optimization": {"stage": 2}}, world_size=2)
    # --global-batch-size 8, --micro-batch-size 2, DP2 -> 2 accumulation steps.
    assert (filled["train_batch_size"], filled["train_micro_batch_size_per_gpu"],
            filled["gradient_accumulation_steps"]) == (8, 2, 2)
    assert filled["gradient_clipping"] == 1.0 and filled["bf16"]["enabled"] is False
    filled = _check({}, world_size=1)
    assert filled["gradient_accumulation_steps"] == 4 and filled["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("config, message", [
    ({"train_batch_size": 16}, "ds_config.json: train_batch_size 16 != --global-batch-size 8"),
    ({"train_micro_batch_size_per_gpu": 4}, "ds_config.json: train_micro_batch_size_per_gpu 4 != --micro-batch-size 2"),
    ({"gradient_accumulation_steps": 4},
     "ds_config.json: gradient_accumulation_steps 4 != --global-batch-size 8 / (--micro-batch-size 2 x "
     "data-parallel size 2) = 2"),
    ({"bf16": {"enabled": True}}, "ds_config.json: bf16.enabled true != --bf16 not given"),
    ({"gradient_clipping": 0.5}, "ds_config.json: gradient_clipping 0.5 != --clip-grad 1.0"),
    ({"zero_optimization": {"stage": 0}}, "ds_config.json: zero_optimization.stage 0 is not supported"),
], ids=["train_batch_size", "micro_batch", "accumulation", "bf16", "clipping", "stage0"])
def test_config_disagreement_is_one_line_naming_key_and_flag(config, message):
    with pytest.raises(ValueError) as error:
        _check(config)
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_config_bf16_flag_without_json_section_and_fp16_mismatch():
    assert _check({}, extra=["--bf16"])["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match=r"^ds_config.json: fp16.enabled false != --fp16 given$"):
        _check({"fp16": {"enabled": False}}, extra=["--fp16"])


def test_refused_layouts():
    with pytest.raises(ValueError, match=r"^ds_config.json: zero_optimization.stage 2 needs "
                                         r"--pipeline-model-parallel-size 1, got 2 "):
        _check({"zero_optimization": {"stage": 2}}, extra=["--pipeline-model-parallel-size", "2"])
    with pytest.raises(ValueError, match=r"zero_optimization.stage 3 needs --pipeline-model-parallel-size 1"):
        _check({"zero_optimization": {"stage": 3}}, extra=["--pipeline-model-parallel-size", "2"], world_size=4)
    with pytest.raises(ValueError, match=r"^--num-layers-per-virtual-pipeline-stage \(virtual pipeline\) is not "
                                         r"supported with --deepspeed"):
        _check({"zero_optimization": {"stage": 1}},
               extra=["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"])
    with pytest.raises(ValueError, match=r"^ds_config.json: data_types.grad_accum_dtype fp32 with bf16 needs "
                                         r"zero_optimization.stage 2 or 3"):
        _check({"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}, extra=["--bf16"])
    # Stage 1 with pipeline parallelism is supported.
    assert _check({"zero_optimization": {"stage": 1}}, extra=["--pipeline-model-parallel-size", "2"])


def test_example_configs_agree_with_a_bf16_launch():
    for stage in (1, 2, 3):
        path = os.path.join(ROOT, "examples", f"ds_config_zero{stage}.json")
        with open(path) as f:
            config = json.load(f)
        filled = _check(config, extra=["--bf16"], world_size=2)
        assert filled["zero_optimization"]["stage"] == stage and filled["bf16"]["enabled"] is True


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # ZeRO-3 (the partitioned parameters); ZeRO-1 state is covered by the HF export tests
def test_zero_resume_continues_the_run(stage, reference, tmp_path):
    """Save at iteration 2 (model weights through dist_checkpointing, gathered under ZeRO-3; DeepSpeed's optimizer
    state beside them), resume in a new launch: iterations 3-4 are those of the uninterrupted run."""
    ds_config = write_ds_config(tmp_path, f"zero{stage}", {"zero_optimization": {"stage": stage}})
    flags = TINY_GPT + ["--clip-grad", str(CLIP), "--deepspeed", "--deepspeed_config", ds_config]
    save = str(tmp_path / "checkpoints")
    first = run_pretrain(flags + ["--save", save, "--save-interval", "2", "--exit-interval", "2"], tmp_path,
                         nproc=2, name="first")
    resumed = run_pretrain(flags + ["--load", save], tmp_path, nproc=2, name="resumed")
    assert [h["iteration"] for h in resumed["train_history"]] == [3, 4]
    assert_real_updates(update_learning_rates(first, flags) + update_learning_rates(resumed, flags, resumed_from=first))
    assert_close(losses(first) + losses(resumed), losses(reference), rtol=1e-5, what=f"ZeRO-{stage} resumed lm loss")
    assert_close([resumed["valid"]["lm loss"]], [reference["valid"]["lm loss"]], rtol=1e-5,
                 what=f"ZeRO-{stage} resumed validation lm loss")
    assert_close(losses(resumed, "grad_norm"), losses(reference, "grad_norm")[2:], rtol=1e-5,
                 what=f"ZeRO-{stage} resumed grad norm")
