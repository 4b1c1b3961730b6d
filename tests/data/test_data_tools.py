"""inspect_data.py and train_tokenizer.py as users run them, and the data flags' validation."""

import os
import subprocess
import sys

import pytest

from megatron_cocomix.arguments import ArgumentError, parse_args
from tests.helpers.data_files import write_jsonl
from tests.helpers.paths import CORPUS, GPT2_FLAGS, ROOT


def test_quickstart_corpus_preprocess_and_inspect(tmp_path):
    """docs/data.md's path: shipped corpus -> preprocess_data.py -> inspect_data.py, as subprocesses."""
    prefix = str(tmp_path / "shakespeare")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", CORPUS,
                           "--output-prefix", prefix, *GPT2_FLAGS, "--append-eod", "--workers", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {prefix}_text_document.bin/.idx: 781 documents" in done.stdout
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "inspect_data.py"), "--data-path",
                           prefix + "_text_document", *GPT2_FLAGS, "--document", "3", "--top", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "dtype       uint16" in out and "documents   781" in out
    assert "A Midsummer Night's Dream. ACT II, SCENE II." in out and "ends with eod (50256): True" in out
    assert "token histogram (top 3" in out and "'\\n'" in out


def test_inspect_refuses_bad_document_index(preprocess, tmp_path, capsys):
    assert preprocess.main(["--input", write_jsonl(tmp_path / "a.jsonl", ["one", "two"]), "--output-prefix",
                            str(tmp_path / "a"), *GPT2_FLAGS, "--quiet"]) == 0
    capsys.readouterr()
    from tools import inspect_data

    rc = inspect_data.main(["--data-path", str(tmp_path / "a_text_document"), "--document", "2"])
    assert rc == 2 and "error: --document 2: the dataset has 2 documents" in capsys.readouterr().err


def test_train_tokenizer_errors(tmp_path, capsys):
    from tools import train_tokenizer as tool

    good = write_jsonl(tmp_path / "a.jsonl", ["some text"])
    (tmp_path / "empty.jsonl").write_text('{"other": 1}\n')
    for argv, message in [
        (["--input", good, "--model-prefix", str(tmp_path / "m"), "--vocab-size", "100"], "--vocab-size 100: must be"),
        (["--input", good, "--model-prefix", str(tmp_path / "no" / "m")], "does not exist"),
        (["--input", str(tmp_path / "empty.jsonl"), "--model-prefix", str(tmp_path / "m")], "no text found"),
        (["--input", str(tmp_path / "nothing")], "no such file or directory"),
    ]:
        if "--model-prefix" not in argv:
            argv = argv + ["--model-prefix", str(tmp_path / "m")]
        assert tool.main(argv + ["--no-progress"]) == 2  # stderr is then the error line alone
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".model", ".txt"))]


BASE = ("--num-layers 2 --hidden-size 8 --num-attention-heads 2 --seq-length 16 --micro-batch-size 2 "
        "--train-iters 3 --lr 1e-3").split()


def test_data_flags_validation(tmp_path):
    gpt2 = GPT2_FLAGS
    args = parse_args(BASE + ["--data-path", "0.7", "a", "0.3", "b"] + gpt2, world_size=1)
    assert args.split == "969,30,1" and args.tokenizer_type == "GPT2BPETokenizer"
    args = parse_args(BASE + ["--mock-data", "--vocab-size", "100"], world_size=1)
    assert args.tokenizer_type == "NullTokenizer"
    for extra, message in [
        (["--data-path", "0.7", "a", "0.3"] + gpt2, "looks like a weight"),
        (["--data-path", "0.7", "a", "-1", "b"] + gpt2, "weight '-1' must be a positive number"),
        (["--data-path", "a", "--split", "0,1,0"] + gpt2, "--split 0,1,0: expected"),
        (["--data-path", "a", "--split", "90,x"] + gpt2, "--split 90,x: expected"),
        (["--train-data-path", "a", "--split", "9,1,0"] + gpt2, "--split 9,1,0 only applies to --data-path"),
        (["--data-path", "a", "--train-data-path", "b"] + gpt2, "mutually exclusive"),
        (["--mock-data", "--data-path", "a", "--vocab-size", "5"], "--mock-data cannot be combined"),
        ([], "no training data"),
        (["--data-path", "a"], "--tokenizer-type is required"),
        (["--data-path", "a", "--tokenizer-type", "GPT2BPETokenizer"], "needs --vocab-file"),
        (["--data-path", "a", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "/no/such.model"],
         "--tokenizer-model /no/such.model: no such file"),
        (["--mock-data"], "--vocab-size (positive) is required"),
        (["--mock-data", "--vocab-size", "5", "--num-workers", "-1"], "--num-workers must be >= 0"),
    ]:
        with pytest.raises(ArgumentError, match=None) as info:
            parse_args(BASE + extra, world_size=1)
        assert message in str(info.value), (extra, str(info.value))
