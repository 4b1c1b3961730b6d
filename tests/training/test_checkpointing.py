"""Checkpoints: layout change on load, bit-exact resume (dropout on), an interrupted save, and refused checkpoints.

Every check compares against a run that did not go through the code under test: the uninterrupted run's logged
losses (exact equality: same layout, same data, same RNG streams), or the saving run's own validation loss.
"""

import os
import re
import textwrap

import pytest

from megatron_cocomix.training import checkpointing
from tests.helpers.checkpoint_files import checkpoint_copy, history
from tests.helpers.launch import (
    PRETRAIN_WORKER,
    TINY_GPT,
    assert_close,
    assert_real_updates,
    run_pretrain,
    run_script,
    update_learning_rates,
)

DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
TIMEOUT = 600


def with_flags(base, **flags):
    """TINY_GPT with some values replaced (flag names with underscores for dashes)."""
    out = list(base)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        out[out.index(flag) + 1] = str(value)
    return out


def tracker(root: str) -> str:
    with open(os.path.join(root, checkpointing.TRACKER)) as f:
        return f.read()


# ------------------------------------------------------------------------------------------------------------
# (1) TP2 x PP2 -> TP1 x PP1: weights (validation loss) and optimizer state (the next training losses)


def test_tp2_pp2_checkpoint_loads_at_tp1(tmp_path):
    saved = str(tmp_path / "tp2pp2")
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    source = run_pretrain([*TINY_GPT, *layout, "--save", saved, "--save-interval", "2"], tmp_path, nproc=4,
                          name="tp2pp2", timeout=TIMEOUT)
    assert tracker(saved) == "4"
    assert sorted(os.listdir(saved)) == ["iter_0000002", "iter_0000004", checkpointing.TRACKER]

    # Weights only (--finetune), no training: the validation loss of the saving run's final model.
    evaluated = run_pretrain([*TINY_GPT, "--load", saved, "--finetune", "--skip-train"], tmp_path,
                             name="tp1_eval", timeout=TIMEOUT)
    assert evaluated["iteration"] == 0 and evaluated["train_history"] == []
    assert_close([evaluated["valid"]["lm loss"]], [source["valid"]["lm loss"]], rtol=1e-5,
                 what="validation loss at TP1 of the TP2xPP2 checkpoint")

    # Resume iteration 2 at TP1 with the optimizer and scheduler: iterations 3 and 4 continue the TP2xPP2 run
    # (to layout round-off: dropout is off, RNG states do not carry over to another layout).
    resumed_from = checkpoint_copy(saved, 2, str(tmp_path / "at_2"))
    resumed = run_pretrain([*TINY_GPT, "--load", resumed_from], tmp_path, name="tp1_resume", timeout=TIMEOUT)
    assert "RNG states not loaded: saved at TP2 x PP2 x DP1" in resumed["stdout"]
    assert sorted(history(resumed)) == [3, 4]
    assert_close([history(resumed)[i] for i in (3, 4)], [history(source)[i] for i in (3, 4)], rtol=1e-5,
                 what="TP1 losses after resuming the TP2xPP2 optimizer state")
    assert_close([resumed["train_history"][0]["lr"]], [source["train_history"][2]["lr"]], rtol=1e-12,
                 what="learning rate at iteration 3")
    # Steps 1-2 at TP2 x PP2, 3-4 at TP1, all with a non-zero learning rate; the validation follows step 4.
    assert_real_updates(update_learning_rates(source, TINY_GPT)[:2]
                        + update_learning_rates(resumed, TINY_GPT, resumed_from=source))
    assert_close([resumed["valid"]["lm loss"]], [source["valid"]["lm loss"]], rtol=1e-5,
                 what="TP1 validation loss after resuming the TP2xPP2 optimizer state")


# ------------------------------------------------------------------------------------------------------------
# (2) Resume at N == the uninterrupted run, bit for bit, with dropout on


RESUME_LAYOUTS = {
    "tp2": pytest.param(["--tensor-model-parallel-size", "2"], id="tp2"),
    "dp2_distributed_optimizer": pytest.param(["--use-distributed-optimizer"], id="dp2_distributed_optimizer",
                                              marks=pytest.mark.slow),
}


@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS.values()))
def test_resume_is_bit_exact_two_processes(tmp_path, layout):
    saved = str(tmp_path / "ckpt")
    flags = [*TINY_GPT, *DROPOUT, *layout]
    full = run_pretrain([*flags, "--save", saved, "--save-interval", "2"], tmp_path, nproc=2, name="full",
                        timeout=TIMEOUT)
    resumed = run_pretrain([*flags, "--load", checkpoint_copy(saved, 2, str(tmp_path / "at_2"))], tmp_path,
                           nproc=2, name="resumed", timeout=TIMEOUT)
    assert "RNG" in resumed["stdout"] and "not loaded" not in resumed["stdout"]
    assert sorted(history(resumed)) == [3, 4]
    assert_real_updates(update_learning_rates(full, flags)[:2] + update_learning_rates(resumed, flags, resumed_from=full))
    for i in (3, 4):
        assert history(resumed)[i] == history(full)[i], f"iteration {i}: {history(resumed)[i]!r} vs {history(full)[i]!r}"
    assert resumed["valid"]["lm loss"] == full["valid"]["lm loss"]


# ------------------------------------------------------------------------------------------------------------
# (3) One process: a save that fails midway, then resume; compared with a run that never saved


FAILING_DRIVER = textwrap.dedent("""
    # Runs the test driver with the checkpoint writer failing on its second save, after common.pt is written
    # and before any tensor file: what a process killed in the middle of a save leaves behind. The repository
    # root is on PYTHONPATH (run_script's environment).
    import runpy, sys
    from megatron_cocomix.training import checkpointing

    real_save = checkpointing.InProcessTorchDistSave.save
    calls = []

    def failing_save(self, sharded_state_dict, checkpoint_dir):
        calls.append(checkpoint_dir)
        if len(calls) == 2:
            raise RuntimeError("injected failure in the middle of a checkpoint save")
        return real_save(self, sharded_state_dict, checkpoint_dir)

    checkpointing.InProcessTorchDistSave.save = failing_save
    sys.argv = [{driver!r}] + sys.argv[1:]
    runpy.run_path({driver!r}, run_name="__main__")
""")


@pytest.fixture(scope="module")
def single_process_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single_process")
    flags = [*TINY_GPT, *DROPOUT]
    empty = str(tmp / "empty")
    os.makedirs(empty)
    # Reference: never saves; --load at an empty directory starts from scratch with a warning.
    reference = run_pretrain([*flags, "--load", empty], tmp, name="reference", timeout=TIMEOUT)

    saved = str(tmp / "ckpt")
    driver = tmp / "failing_driver.py"
    driver.write_text(FAILING_DRIVER.format(driver=PRETRAIN_WORKER))
    failed = run_script(str(driver), [str(tmp / "failed.json"), *flags, "--save", saved, "--save-interval", "2"],
                        timeout=TIMEOUT, check=False)
    after_failure = {"returncode": failed.returncode, "stderr": failed.stderr, "listing": sorted(os.listdir(saved)),
                     "tracker": tracker(saved)}
    temporaries = [n for n in after_failure["listing"] if ".tmp-" in n]
    after_failure["temporary_files"] = sorted(os.listdir(os.path.join(saved, temporaries[0]))) if temporaries else []

    resumed = run_pretrain([*flags, "--load", saved, "--save", saved, "--save-interval", "2"], tmp, name="resumed",
                           timeout=TIMEOUT)
    return {"reference": reference, "after_failure": after_failure, "resumed": resumed, "saved": saved,
            "tmp": tmp}


def test_load_without_checkpoint_starts_from_scratch(single_process_runs):
    reference = single_process_runs["reference"]
    assert "no latest_checkpointed_iteration.txt and no checkpoint there; training starts from scratch" in \
        reference["stdout"]
    assert sorted(history(reference)) == [1, 2, 3, 4]


def test_killed_save_leaves_previous_checkpoint(single_process_runs):
    after = single_process_runs["after_failure"]
    assert after["returncode"] != 0 and "injected failure in the middle of a checkpoint save" in after["stderr"]
    # latest still names the complete iteration-2 checkpoint; iteration 4 exists only as a temporary directory
    # holding part of the files.
    assert after["tracker"] == "2"
    assert [n for n in after["listing"] if not n.startswith("iter_0000004.tmp-")] == \
        ["iter_0000002", checkpointing.TRACKER]
    assert len(after["listing"]) == 3
    assert "common.pt" in after["temporary_files"] and "metadata.json" not in after["temporary_files"]


def test_resume_after_killed_save_is_bit_exact(single_process_runs):
    reference, resumed = single_process_runs["reference"], single_process_runs["resumed"]
    assert "loaded checkpoint" in resumed["stdout"] and "at iteration 2" in resumed["stdout"]
    assert sorted(history(resumed)) == [3, 4]
    flags = [*TINY_GPT, *DROPOUT]
    assert_real_updates(update_learning_rates(reference, flags)[:2]
                        + update_learning_rates(resumed, flags, resumed_from=reference))
    for i in (3, 4):
        assert history(resumed)[i] == history(reference)[i], \
            f"iteration {i}: {history(resumed)[i]!r} vs uninterrupted {history(reference)[i]!r}"
    assert resumed["valid"]["lm loss"] == reference["valid"]["lm loss"]
    # The next save removed the dead temporary directory and moved latest on.
    saved = single_process_runs["saved"]
    assert sorted(os.listdir(saved)) == ["iter_0000002", "iter_0000004", checkpointing.TRACKER]
    assert tracker(saved) == "4"


# ------------------------------------------------------------------------------------------------------------
# (4) Checkpoints that do not fit: one-line errors


def test_model_shape_mismatch_is_refused(single_process_runs):
    saved = single_process_runs["saved"]
    proc = run_script(PRETRAIN_WORKER, [str(single_process_runs["tmp"] / "mismatch.json"),
                               *with_flags(TINY_GPT, hidden_size=128), "--load", saved],
                      timeout=TIMEOUT, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"error: {saved}/iter_0000004 was saved with --hidden-size 64, but this run has "
                    f"--hidden-size 128")


def test_compatibility_check_names_each_flag(single_process_runs):
    import argparse

    from megatron.core import dist_checkpointing

    path = checkpointing.checkpoint_dir(single_process_runs["saved"], 4)
    common = dist_checkpointing.load_common_state_dict(path)
    matching = argparse.Namespace(num_layers=4, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                                  num_query_groups=4, padded_vocab_size=256, true_vocab_size=256)
    checkpointing.check_compatible(path, common, matching)
    # Another padding of the same vocabulary (another TP) loads: the vocabulary tensors are re-padded.
    checkpointing.check_compatible(path, common, argparse.Namespace(**{**vars(matching), "padded_vocab_size": 384}))
    for name, value, message in [
            ("num_layers", 2, "saved with --num-layers 4, but this run has --num-layers 2"),
            ("num_attention_heads", 8, "saved with --num-attention-heads 4, but this run has --num-attention-heads 8"),
            ("true_vocab_size", 300, "saved with a vocabulary of 256 ids, but this run's tokenizer / --vocab-size "
                                     "has 300")]:
        args = argparse.Namespace(**{**vars(matching), name: value})
        with pytest.raises(checkpointing.CheckpointError, match=re.escape(message)):
            checkpointing.check_compatible(path, common, args)
    # A checkpoint from before true_vocab_size was recorded must match the padded size.
    older = {**common, "model_args": {k: v for k, v in common["model_args"].items() if k != "true_vocab_size"}}
    with pytest.raises(checkpointing.CheckpointError, match=re.escape(
            "saved with a padded vocabulary of 256, but this run's tokenizer / --vocab-size and "
            "--make-vocab-size-divisible-by give 384")):
        checkpointing.check_compatible(path, older, argparse.Namespace(**{**vars(matching), "padded_vocab_size": 384}))


def test_truncated_or_missing_shard_is_refused(single_process_runs, tmp_path):
    """A shard cut short (a copy interrupted, a full disk) or gone: one line naming the file, before loading."""
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(checkpointing.checkpoint_dir(single_process_runs["saved"], 4), root / "iter_0000004")
    (root / checkpointing.TRACKER).write_text("4")
    path = str(root / "iter_0000004")
    checkpointing.verify_checkpoint_files(path)  # intact
    shard = max((os.path.join(path, n) for n in os.listdir(path) if n.endswith(".distcp")), key=os.path.getsize)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    proc = run_script(PRETRAIN_WORKER, [str(tmp_path / "truncated.json"), *TINY_GPT, "--load", str(root)],
                      timeout=TIMEOUT, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(rf"error: {re.escape(shard)}: truncated \({size // 2} bytes, the "
                                             rf"checkpoint's index needs \d+\)", errors[0]), proc.stderr[-2000:]
    os.remove(shard)
    with pytest.raises(checkpointing.CheckpointError, match=f"{re.escape(shard)}: missing"):
        checkpointing.verify_checkpoint_files(path)
    os.remove(os.path.join(path, "common.pt"))
    with pytest.raises(checkpointing.CheckpointError, match="common.pt: missing"):
        checkpointing.verify_checkpoint_files(path)


def test_tracker_errors(tmp_path):
    root = str(tmp_path)
    assert checkpointing.resolve_checkpoint(root) is None  # empty: start from scratch
    os.makedirs(os.path.join(root, "iter_0000003.tmp-1-2"))
    assert checkpointing.resolve_checkpoint(root) is None  # a dead temporary is not a checkpoint
    with open(os.path.join(root, checkpointing.TRACKER), "w") as f:
        f.write("7")
    with pytest.raises(checkpointing.CheckpointError, match="names iteration 7 but .*iter_0000007 does not exist"):
        checkpointing.resolve_checkpoint(root)
    with open(os.path.join(root, checkpointing.TRACKER), "w") as f:
        f.write("seven")
    with pytest.raises(checkpointing.CheckpointError, match="expected an iteration number, found 'seven'"):
        checkpointing.resolve_checkpoint(root)
    os.remove(os.path.join(root, checkpointing.TRACKER))
    os.makedirs(os.path.join(root, "iter_0000005"))
    with pytest.raises(checkpointing.CheckpointError, match="is missing but .* holds iter_0000005"):
        checkpointing.resolve_checkpoint(root)
