"""Resuming at another layout, and the resume matrix: what each optimizer's state survives, and the load flags.

Every resumed run is compared with the run that saved the checkpoint and went on uninterrupted: the same losses
bit for bit at the same layout, to 1e-5 at another (another data-parallel size sums the same gradients in
another order). The global batch stays 8 sequences: DP4 runs 1 micro-batch per rank, DP2 2, DP1 4.

- megatron's distributed optimizer: DP4 -> DP2 and DP4 -> DP1, DP1 -> DP2 (its default, Megatron-LM's
  `dp_reshardable` form); TP2 x DP2 -> TP1 x DP2 and -> TP1 x DP1 (--dist-ckpt-optim-fully-reshardable); the
  bucket form refused at another TP in one line that names the flag.
- --overlap-param-gather (with --overlap-grad-reduce): the same losses as without; its checkpoint (saved with no
  forward since the step, so the parameters outside each rank's shard must be gathered first) holds the same
  weights as the plain run's (loaded alone, the same validation loss) and resumes at DP2 with the same losses.
- DeepSpeed ZeRO-1 and ZeRO-2 resumed mid-run at DP2; then, converted once with tools/ds_to_universal.py, at
  DP1; without the conversion refused in one line naming the command.
- --no-load-optim and --no-load-rng as Megatron-LM: the iteration and data position continue; without the
  optimizer the learning-rate schedule restarts and Adam starts afresh; without the RNG states dropout draws
  other masks while the optimizer and schedule continue.
- --fp16 with dynamic loss scaling: overflowing steps are skipped and back the scale off; a resumed run continues
  with the saved scale (no new skips) and the same losses.
- Optimizer state of the other back end (DeepSpeed <-> megatron) refused in one line naming both.

Launches are shared (4 in all, in the order the moves need: 1 process, 4, 2, then 1 again); each holds several
runs (tests/helpers/multi_run_worker.py).
"""

import json
import os
import re

import pytest

from tests.helpers.checkpoint_files import checkpoint_copy, history
from tests.helpers.launch import MULTI_RUN_WORKER, TINY_GPT, assert_close, run_script
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow

DISTRIBUTED = ["--use-distributed-optimizer"]
FULLY = DISTRIBUTED + ["--dist-ckpt-optim-fully-reshardable"]
OVERLAP = DISTRIBUTED + ["--overlap-grad-reduce", "--overlap-param-gather"]
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
FP16 = ["--fp16", "--initial-loss-scale", "4194304", "--train-iters", "10"] + DISTRIBUTED
TIMEOUT = 900


def save(root, interval: int = 2) -> list:
    return ["--save", str(root), "--save-interval", str(interval)]


def zero(tmp, stage: int) -> list:
    path = tmp / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return ["--deepspeed", "--deepspeed_config", str(path)]


def launch(tmp, name: str, nproc: int, runs: list) -> tuple:
    """One launch of several runs; returns ({run: summary}, the launch's stderr)."""
    spec, out = tmp / f"{name}.spec.json", tmp / f"{name}.summary.json"
    spec.write_text(json.dumps([[n, kind, [str(a) for a in argv]] for n, kind, argv in runs]))
    proc = run_script(MULTI_RUN_WORKER, [str(spec), str(out)], nproc=nproc, timeout=TIMEOUT)
    return json.loads(out.read_text()), proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resharding")
    ck = {name: tmp / name for name in ("dp1", "dropout", "fp16", "dp4", "tp2dp2", "overlap", "z1", "z2")}
    results, errors = {}, {}

    # 1 process: the sources of the moves up from DP1 and of the single-process resume matrix.
    out, _ = launch(tmp, "one_a", 1, [
        ("dp1", "pretrain", TINY_GPT + DISTRIBUTED + save(ck["dp1"])),
        ("dropout", "pretrain", TINY_GPT + DROPOUT + save(ck["dropout"])),
        ("fp16", "pretrain", TINY_GPT + FP16 + save(ck["fp16"], 6))])
    results.update(out)

    # 4 ranks: the sources of the moves down from DP4 and TP2 x DP2. The overlap run validates only at
    # iteration 3, so that nothing runs a forward between the step of iteration 2 and its save.
    out, _ = launch(tmp, "four", 4, [
        ("dp4", "pretrain", TINY_GPT + DISTRIBUTED + save(ck["dp4"])),
        ("tp2dp2", "pretrain", TINY_GPT + FULLY + ["--tensor-model-parallel-size", "2"] + save(ck["tp2dp2"])),
        ("overlap", "pretrain", TINY_GPT + OVERLAP + ["--eval-interval", "3"] + save(ck["overlap"]))])
    results.update(out)
    at2 = {name: checkpoint_copy(str(ck[name]), 2, str(tmp / f"{name}_at2"))
           for name in ("dp1", "dropout", "dp4", "tp2dp2", "overlap")}
    at2["fp16"] = checkpoint_copy(str(ck["fp16"]), 6, str(tmp / "fp16_at6"))

    # 2 ranks: DP4 -> DP2, DP1 -> DP2, TP2 x DP2 -> TP1 x DP2; ZeRO-1/2 saved, copied and resumed at DP2.
    z1, z2 = zero(tmp, 1), zero(tmp, 2)
    out, stderr = launch(tmp, "two", 2, [
        ("dp4_to_dp2", "pretrain", TINY_GPT + DISTRIBUTED + ["--load", at2["dp4"]]),
        ("dp1_to_dp2", "pretrain", TINY_GPT + DISTRIBUTED + ["--load", at2["dp1"]]),
        ("tp2dp2_to_tp1dp2", "pretrain", TINY_GPT + DISTRIBUTED + ["--load", at2["tp2dp2"]]),
        ("overlap_to_dp2", "pretrain", TINY_GPT + OVERLAP + ["--load", at2["overlap"]]),
        ("overlap_weights", "pretrain", TINY_GPT + ["--load", at2["overlap"], "--finetune", "--skip-train"]),
        ("dp4_weights", "pretrain", TINY_GPT + ["--load", at2["dp4"], "--finetune", "--skip-train"]),
        ("buckets_at_tp2", "pretrain_error", TINY_GPT + DISTRIBUTED + ["--tensor-model-parallel-size", "2",
                                                                          "--load", at2["dp4"]]),
        ("z1", "pretrain", TINY_GPT + z1 + save(ck["z1"])),
        ("z2", "pretrain", TINY_GPT + z2 + save(ck["z2"])),
        ("copy_z1", "copy", [ck["z1"], 2, tmp / "z1_at2"]),
        ("copy_z1_raw", "copy", [ck["z1"], 2, tmp / "z1_raw_at2"]),
        ("copy_z2", "copy", [ck["z2"], 2, tmp / "z2_at2"]),
        ("z1_resumed", "pretrain", TINY_GPT + z1 + ["--load", tmp / "z1_at2"]),
        ("z2_resumed", "pretrain", TINY_GPT + z2 + ["--load", tmp / "z2_at2"])])
    results.update(out)
    errors["two"] = stderr

    # The documented command, once per checkpoint.
    converted = {}
    for name in ("z1", "z2"):
        proc = run_script(os.path.join(ROOT, "tools", "ds_to_universal.py"),
                          ["--load", str(tmp / f"{name}_at2"), "--workers", "1", "--no-progress"], timeout=TIMEOUT)
        converted[name] = proc.stdout

    # 1 process: DP4 -> DP1, TP2 x DP2 -> TP1, ZeRO-1/2 DP2 -> DP1 (universal), the load flags, fp16, refusals.
    out, stderr = launch(tmp, "one_b", 1, [
        ("dp4_to_dp1", "pretrain", TINY_GPT + DISTRIBUTED + ["--load", at2["dp4"]]),
        ("tp2dp2_to_tp1", "pretrain", TINY_GPT + DISTRIBUTED + ["--load", at2["tp2dp2"]]),
        ("z1_to_dp1", "pretrain", TINY_GPT + z1 + ["--load", tmp / "z1_at2"]),
        ("z2_to_dp1", "pretrain", TINY_GPT + z2 + ["--load", tmp / "z2_at2"]),
        ("no_load_optim", "pretrain", TINY_GPT + DROPOUT + ["--load", at2["dropout"], "--no-load-optim"]),
        ("no_load_rng", "pretrain", TINY_GPT + DROPOUT + ["--load", at2["dropout"], "--no-load-rng"]),
        ("fp16_resumed", "pretrain", TINY_GPT + FP16 + ["--load", at2["fp16"]]),
        ("megatron_loads_deepspeed", "pretrain_error", TINY_GPT + DISTRIBUTED + ["--load", tmp / "z1_at2"]),
        ("deepspeed_loads_megatron", "pretrain_error", TINY_GPT + z1 + ["--load", at2["dp1"]]),
        ("deepspeed_unconverted", "pretrain_error", TINY_GPT + z1 + ["--load", tmp / "z1_raw_at2"])])
    results.update(out)
    errors["one_b"] = stderr
    return {"results": results, "errors": errors, "converted": converted, "tmp": tmp}


def continued(runs, resumed: str, source: str, rtol: float = 1e-5) -> None:
    """Iterations 3 and 4 (and the final validation) of `resumed` are those of `source` after its save at 2."""
    got, ref = runs["results"][resumed], runs["results"][source]
    assert sorted(history(got)) == [3, 4], (resumed, history(got))
    assert_close([history(got)[i] for i in (3, 4)], [history(ref)[i] for i in (3, 4)], rtol=rtol,
                 what=f"{resumed} vs {source}")
    assert_close([got["valid"]["lm loss"]], [ref["valid"]["lm loss"]], rtol=rtol, what=f"{resumed} validation")


def error_lines(stderr: str) -> list:
    """The distinct `error:` lines of a launch (each rank prints its own; two ranks' lines may share a line of the
    launch's stderr when they write at the same moment)."""
    return sorted({"error: " + part for line in stderr.splitlines() for part in line.split("error: ")[1:]})


def test_distributed_optimizer_shrinks_and_grows_data_parallel(runs):
    continued(runs, "dp4_to_dp2", "dp4")
    continued(runs, "dp4_to_dp1", "dp4")
    continued(runs, "dp1_to_dp2", "dp1")


def test_distributed_optimizer_fully_reshardable_moves_to_tp1(runs):
    continued(runs, "tp2dp2_to_tp1dp2", "tp2dp2")
    continued(runs, "tp2dp2_to_tp1", "tp2dp2")
    # The form is recorded in the checkpoint: the loading runs did not pass the flag.
    assert runs["results"]["tp2dp2_to_tp1"]["iteration"] == 4


def test_bucket_form_refused_at_another_tp(runs):
    assert runs["results"]["buckets_at_tp2"]["exit_code"] == 2
    [line] = [e for e in error_lines(runs["errors"]["two"]) if "data-parallel buckets" in e]
    assert re.fullmatch(r"error: \S+dp4_at2/iter_0000002: distributed optimizer state saved at TP1 x PP1 x DP4 in "
                        r"data-parallel buckets reloads only at the same TP and PP \(any DP\), this run is TP2 x PP1 "
                        r"x DP1; save with --dist-ckpt-optim-fully-reshardable to change TP or PP: add "
                        r"--no-load-optim to load the weights only", line), line


def test_overlap_param_gather_same_losses_and_checkpoint(runs):
    plain, overlap = runs["results"]["dp4"], runs["results"]["overlap"]
    assert history(overlap) == history(plain)
    assert overlap["valid"]["lm loss"] == plain["valid"]["lm loss"]
    # The saved weights are the gathered ones: loaded alone they validate as the plain run's saved at the same
    # iteration (the optimizer state would restore each rank's own shard even from stale weights).
    weights, plain_weights = runs["results"]["overlap_weights"], runs["results"]["dp4_weights"]
    assert weights["valid"]["lm loss"] == plain_weights["valid"]["lm loss"]
    continued(runs, "overlap_to_dp2", "dp4")


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_resumed_mid_run_and_at_another_dp_size(runs, stage):
    name = f"z{stage}"
    continued(runs, f"{name}_resumed", name, rtol=0)
    assert f"{name}_at2/iter_0000002/deepspeed_optimizer/pp_rank_000/universal: written" in runs["converted"][name]
    continued(runs, f"{name}_to_dp1", name)


def test_zero_at_another_dp_size_needs_the_conversion(runs):
    assert runs["results"]["deepspeed_unconverted"]["exit_code"] == 2
    [line] = [e for e in error_lines(runs["errors"]["one_b"]) if "z1_raw_at2" in e]
    assert line.endswith("DeepSpeed optimizer state saved at TP1 x PP1 x DP2, ZeRO-1, and this run at TP1 x PP1 x "
                         "DP1, ZeRO-1: convert it once into a universal checkpoint with `python "
                         f"tools/ds_to_universal.py --load {runs['tmp'] / 'z1_raw_at2'} --iteration 2`: add "
                         "--no-load-optim to load the weights only"), line


def test_no_load_optim_and_no_load_rng_as_megatron(runs):
    full = runs["results"]["dropout"]
    no_optim, no_rng = runs["results"]["no_load_optim"], runs["results"]["no_load_rng"]
    lr = {name: history(run, "lr") for name, run in (("full", full), ("no_optim", no_optim), ("no_rng", no_rng))}
    for run in (no_optim, no_rng):
        assert sorted(history(run)) == [3, 4]  # the iteration and the data position continue
    # Without the optimizer: same weights, data and dropout at 3; the schedule restarts (iteration 3 gets the
    # learning rate of iteration 1) and Adam starts afresh, so iteration 4 differs.
    assert history(no_optim)[3] == history(full)[3]
    assert lr["no_optim"][3] == lr["full"][1] and lr["no_optim"][4] == lr["full"][2]
    assert history(no_optim)[4] != history(full)[4]
    # Without the RNG states: the schedule and the optimizer continue, dropout draws other masks.
    assert lr["no_rng"] == {3: lr["full"][3], 4: lr["full"][4]}
    assert history(no_rng)[3] != history(full)[3]
    assert abs(history(no_rng)[3] - history(full)[3]) < 0.05 * history(full)[3]


def test_fp16_skips_on_overflow_and_resumes_with_its_loss_scale(runs):
    full, resumed = runs["results"]["fp16"], runs["results"]["fp16_resumed"]
    scale = {e["iteration"]: e["loss_scale"] for e in full["train_history"]}
    skipped = [e["iteration"] for e in full["train_history"] if e.get("skipped")]
    # 2^22 overflows the fp16 gradients: those steps are skipped and the scale backs off (halved from the second
    # overflow on: megatron's hysteresis of 2), then training goes on at the reduced scale.
    assert skipped and skipped == list(range(1, len(skipped) + 1)) and len(skipped) < 6, skipped
    assert [scale[i] for i in skipped] == [4194304 / 2 ** max(0, i - 1) for i in skipped]
    assert all(scale[i] == scale[skipped[-1]] for i in range(skipped[-1], 11))
    assert sorted(history(full)) == list(range(1, 11))
    # Resumed at 6: the saved scale, no new skip, the same losses bit for bit.
    assert [e["iteration"] for e in resumed["train_history"]] == [7, 8, 9, 10]
    assert not any(e.get("skipped") for e in resumed["train_history"])
    assert {e["iteration"]: e["loss_scale"] for e in resumed["train_history"]} == {i: scale[i] for i in (7, 8, 9, 10)}
    assert history(resumed) == {i: history(full)[i] for i in (7, 8, 9, 10)}


def test_optimizer_state_of_the_other_back_end_is_refused(runs):
    results, lines = runs["results"], error_lines(runs["errors"]["one_b"])
    assert results["megatron_loads_deepspeed"]["exit_code"] == 2
    assert results["deepspeed_loads_megatron"]["exit_code"] == 2
    tmp = runs["tmp"]
    assert f"error: {tmp / 'z1_at2' / 'iter_0000002'}: it holds deepspeed optimizer state, this run uses megatron: " \
           f"add --no-load-optim to load the weights only" in lines, lines
    assert f"error: {tmp / 'dp1_at2' / 'iter_0000002'}: it holds megatron optimizer state, this run uses " \
           f"deepspeed: add --no-load-optim to load the weights only" in lines, lines
