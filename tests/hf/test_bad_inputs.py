"""tools/convert_to_hf.py on bad input: one `error:` line, exit status 2, nothing written (no output directory,
no temporary left next to it). Checkpoints of other kinds are made by editing a copy's common.pt."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.helpers.hf_checkpoints import convert


def _edited_copy(checkpoint: str, target: str, edit) -> str:
    shutil.copytree(checkpoint, target)
    with open(os.path.join(target, "latest_checkpointed_iteration.txt")) as f:
        common_path = os.path.join(target, f"iter_{int(f.read()):07d}", "common.pt")
    common = torch.load(common_path, weights_only=False)
    edit(common)
    torch.save(common, common_path)
    return target


def _assert_refused(args, output, match):
    code, out, err = convert(args + ["--output", output])
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], (code, out, err)
    assert match in lines[0], lines[0]
    parent = os.path.dirname(output)
    assert not any(".tmp-" in name for name in os.listdir(parent)), os.listdir(parent)
    return lines[0]


def test_no_complete_iteration(tmp_path, single_process):
    empty = tmp_path / "ckpt"
    (empty / "iter_0000002.tmp-123").mkdir(parents=True)
    _assert_refused(["--load", str(empty)], str(tmp_path / "out"), "no complete checkpoint")
    _assert_refused(["--load", str(tmp_path / "missing")], str(tmp_path / "out"), "no such directory")
    assert not (tmp_path / "out").exists()


def test_iteration_not_saved(checkpoints, tmp_path, single_process):
    _assert_refused(["--load", checkpoints("tp1")["gpt2"], "--iteration", "7"], str(tmp_path / "out"),
                    "--iteration 7")
    assert not (tmp_path / "out").exists()
    code, out, err = convert(["--load", checkpoints("tp1")["gpt2"], "--iteration", "2", "--output",
                              str(tmp_path / "out"), "--no-verify"])
    assert code == 0 and "iteration 2" in out and "verify:" not in out, err


def test_missing_tokenizer_then_tokenizer_flags(checkpoints, tmp_path, single_process):
    def drop_tokenizer(common):
        common["export"]["tokenizer"] = None

    old = _edited_copy(checkpoints("tp1")["gpt2"], str(tmp_path / "old"), drop_tokenizer)
    _assert_refused(["--load", old], str(tmp_path / "out"), "records no tokenizer: pass --tokenizer-type")
    assert not (tmp_path / "out").exists()
    code, out, err = convert(["--load", old, "--output", str(tmp_path / "out"), "--tokenizer-type", "NullTokenizer",
                              "--vocab-size", "255"])
    assert code == 0, err
    assert os.path.isfile(tmp_path / "out" / "tokenizer.json")


def test_unsupported_architecture_names_the_flag(checkpoints, tmp_path, single_process):
    def rmsnorm(common):
        common["export"]["args"]["normalization"] = "RMSNorm"

    edited = _edited_copy(checkpoints("tp1")["gpt2"], str(tmp_path / "rms"), rmsnorm)
    line = _assert_refused(["--load", edited], str(tmp_path / "out"), "--normalization RMSNorm with learned positions")
    assert "GPT2LMHeadModel" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_non_empty_output(checkpoints, tmp_path, overwrite, single_process):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    args = ["--load", checkpoints("tp1")["gpt2"], "--no-verify"]
    if not overwrite:
        _assert_refused(args, str(output), "is not empty (add --overwrite")
        assert os.listdir(output) == ["keep.txt"]
    else:
        code, _, err = convert(args + ["--output", str(output), "--overwrite"])
        assert code == 0, err
        assert not (output / "keep.txt").exists() and (output / "model.safetensors").exists()
        assert not any(".tmp-" in name for name in os.listdir(tmp_path))


def test_checkpoint_without_recorded_flags_takes_them_after_dashes(checkpoints, tmp_path, single_process):
    """A checkpoint saved before flags and tokenizer were recorded: refused in one line, then exported with the
    training flags after `--` and the tokenizer flags."""
    from tests.helpers.hf_checkpoints import VARIANTS
    from tests.helpers.launch import TINY_GPT

    def drop_export(common):
        del common["export"]

    old = _edited_copy(checkpoints("tp1")["gpt2"], str(tmp_path / "old"), drop_export)
    tokenizer = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "255"]
    _assert_refused(["--load", old] + tokenizer, str(tmp_path / "out"), "give the training flags after `--`")
    code, out, err = convert(["--load", old, "--output", str(tmp_path / "out")] + tokenizer
                             + ["--"] + TINY_GPT + VARIANTS["gpt2"])
    assert code == 0, err
    assert "verify: max abs logit diff" in out


@pytest.mark.parametrize("variant", ["llama", "cocomix"])
def test_verify_catches_a_wrong_weight(variant, checkpoints, tmp_path, monkeypatch, single_process):
    """A weight map that swaps two heads' query rows in one layer: verify reports it, exits 1, writes nothing."""
    from megatron_cocomix.conversion import export as export_module

    original = export_module.megatron_to_hf

    def swapped(*args, **kwargs):
        state = original(*args, **kwargs)
        name = next(n for n in state if n.endswith(("q_proj.weight", "c_attn.weight")))
        t = state[name]
        rows = t if name.endswith("q_proj.weight") else t.T  # [out, in]
        rows[:16], rows[16:32] = rows[16:32].clone(), rows[:16].clone()
        return state

    monkeypatch.setattr(export_module, "megatron_to_hf", swapped)
    code, out, err = convert(["--load", checkpoints("tp1")[variant], "--output", str(tmp_path / "out")])
    assert code == 1 and "verify FAILED" in err, (code, out, err)
    assert not (tmp_path / "out").exists() and not any(".tmp-" in n for n in os.listdir(tmp_path))
