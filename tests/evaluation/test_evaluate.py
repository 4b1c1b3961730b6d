"""tools/evaluate.py (held-out language modelling) against independent computations.

- the loss equals a plain-torch loop over the same documents with the HF model (one document at a time, the
  Hugging Face sliding-window recipe written out), with windows (documents up to 90 tokens, context 32) and
  without (every document within the context);
- a checkpoint (--load, its megatron model) and its HF export give the same numbers (NTP GPT-2 and CoCoMix);
- the batch size does not change the numbers; bits per byte is the hand computation over the decoded text;
- --split / --eval-split score exactly the documents megatron-core's dataset builder gives that split;
- bad inputs: one `error:` line, exit status 2.
"""

from __future__ import annotations

import json
import math
import os

import numpy
import pytest
import torch

from tests.helpers.evaluation_data import CONTEXT, EOD, PADDED_EOD, run_evaluate, write_documents


def evaluate_json(args, tmp_path, name="out.json") -> dict:
    path = str(tmp_path / name)
    code, out, err = run_evaluate([*args, "--output-json", path])
    assert code == 0, err[-3000:]
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def short_data(tmp_path_factory):
    """Documents of at most CONTEXT tokens: one window each."""
    prefix = os.path.join(str(tmp_path_factory.mktemp("eval_short")), "short")
    return prefix, write_documents(prefix, num_docs=10, seed=1, min_len=3, max_len=CONTEXT)


def reference_nll(hf_dir: str, docs, context: int, stride: int) -> float:
    """Total NLL (nats), one document at a time: the sequence EOD + document, and the HF perplexity recipe with
    windows of context + 1 tokens (the model reads the first `context`, the last is only a label)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    total = 0.0
    for doc in docs:
        seq = torch.tensor([EOD, *doc.tolist()])
        length, prev_end = len(seq), 0
        for begin in range(0, length, stride):
            end = min(begin + context + 1, length)
            target_len = end - max(prev_end, 1)  # position 0 (the leading EOD) is never a target
            window = seq[begin:end]
            with torch.no_grad():
                logits = model(input_ids=window[:-1].unsqueeze(0)).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            for k in range(len(window) - 1 - target_len, len(window) - 1):
                total -= float(logp[k, window[k + 1]])
            prev_end = end
            if end == length:
                break
    return total


@pytest.mark.parametrize("variant", ["gpt2", "cocomix"])
def test_loss_equals_independent_loop_with_sliding_windows(variant, exports, token_data, tmp_path):
    prefix, docs = token_data
    assert max(len(d) for d in docs) > 2 * CONTEXT  # several windows per long document
    for stride in (16, 5):
        result = evaluate_json(["--hf-model", exports[variant], "--data-path", prefix, "--stride", str(stride),
                                "--batch-size", "4"], tmp_path)["models"][0]
        assert result["context"] == CONTEXT and result["stride"] == stride
        assert result["tokens"] == sum(len(d) for d in docs) and result["documents"] == len(docs)
        expected = reference_nll(exports[variant], docs, CONTEXT, stride) / result["tokens"]
        assert abs(result["loss"] - expected) <= 1e-5 * expected, (stride, result["loss"], expected)
        assert abs(result["ppl"] - math.exp(expected)) <= 1e-4 * math.exp(expected)


def test_loss_equals_independent_loop_without_windows(exports, short_data, tmp_path):
    """Every document fits: the plain per-document loss, no window logic at all in the reference."""
    from transformers import AutoModelForCausalLM

    prefix, docs = short_data
    result = evaluate_json(["--hf-model", exports["gpt2"], "--data-path", prefix], tmp_path)["models"][0]
    model = AutoModelForCausalLM.from_pretrained(exports["gpt2"], dtype=torch.float32).eval()
    total = 0.0
    for doc in docs:
        inputs = torch.tensor([EOD, *doc[:-1].tolist()]).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=inputs).logits[0]
        total += float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(doc), reduction="sum"))
    expected = total / sum(len(d) for d in docs)
    assert abs(result["loss"] - expected) <= 1e-5 * expected


def test_checkpoint_and_export_agree(tiny_checkpoints, exports, token_data, tmp_path):
    """--load (the megatron model, this process) and the HF export: same loss to 1e-5, same bits per byte and
    parameter count; the table on stdout and in --output-md, every number and setting in --output-json."""
    prefix, _ = token_data
    md = str(tmp_path / "table.md")
    path = str(tmp_path / "pair.json")
    code, out, err = run_evaluate(["--load", tiny_checkpoints["gpt2"], tiny_checkpoints["cocomix"],
                               "--hf-model", exports["gpt2"], exports["cocomix"],
                               "--name", "ntp", "cocomix", "ntp-hf", "cocomix-hf",
                               "--data-path", prefix, "--data-name", "WikiText-103", "--output-json", path,
                               "--output-md", md])
    assert code == 0, err[-3000:]
    print("\n" + out)
    with open(md) as f:
        assert f.read() == out
    assert out.startswith("| model | parameters | tokens seen | WikiText-103 ppl | bits per byte | tokens scored |")
    with open(path) as f:
        rows = {row["name"]: row for row in json.load(f)["models"]}
    assert list(rows) == ["ntp", "cocomix", "ntp-hf", "cocomix-hf"]
    for name in ("ntp", "cocomix"):
        ckpt, hf = rows[name], rows[f"{name}-hf"]
        assert ckpt["kind"] == "checkpoint" and hf["kind"] == "hf"
        assert abs(ckpt["loss"] - hf["loss"]) <= 1e-5 * hf["loss"], (name, ckpt["loss"], hf["loss"])
        assert abs(ckpt["bits_per_byte"] - hf["bits_per_byte"]) <= 1e-5 * hf["bits_per_byte"]
        assert ckpt["parameters"] == hf["parameters"]
        for key in ("tokens", "documents", "bytes", "context", "stride", "data_path", "data_name"):
            assert ckpt[key] == hf[key], key
        assert f"| {name} |" in out
    assert rows["ntp"]["loss"] != rows["cocomix"]["loss"]


@pytest.mark.parametrize("variant", ["gpt2_padded", "cocomix_bf16", "llama"])
def test_more_checkpoints_and_exports_agree(variant, tiny_checkpoints, exports, tmp_path):
    """A table with padding rows: the softmax over the tokenizer's ids, as the export, and the parameter count
    without the padding rows. A bf16 run and its bf16 export: both evaluated in fp32 from the same weights. A
    Llama-style run (rotary: no position table) and its LlamaForCausalLM export, with sliding windows."""
    eod = PADDED_EOD if variant == "gpt2_padded" else EOD
    prefix = str(tmp_path / "docs")
    write_documents(prefix, num_docs=8, seed=2, eod=eod)
    rows = evaluate_json(["--load", tiny_checkpoints[variant], "--hf-model", exports[variant],
                          "--data-path", prefix], tmp_path)["models"]
    assert abs(rows[0]["loss"] - rows[1]["loss"]) <= 1e-5 * rows[1]["loss"], rows
    assert rows[0]["parameters"] == rows[1]["parameters"]


def test_batch_size_does_not_change_the_numbers(tiny_checkpoints, exports, token_data):
    from megatron_cocomix.evaluation import lm

    _, docs = token_data
    for scorer in (lm.checkpoint_scorer(tiny_checkpoints["cocomix"]), lm.hf_scorer(exports["gpt2"])):
        results = [lm.score(scorer, docs, CONTEXT, 12, batch_size) for batch_size in (1, 3, 64)]
        for other in results[1:]:
            assert other["tokens"] == results[0]["tokens"] and other["bytes"] == results[0]["bytes"]
            assert abs(other["nll"] - results[0]["nll"]) <= 1e-6 * results[0]["nll"], scorer.name


def test_bits_per_byte_by_hand(exports, token_data, tmp_path):
    """NullTokenizer text is the decimal ids joined by spaces; the final EOD is not text, its NLL counts."""
    prefix, docs = token_data
    result = evaluate_json(["--hf-model", exports["cocomix"], "--data-path", prefix, "--max-documents", "7"],
                           tmp_path)["models"][0]
    docs = docs[:7]
    assert result["documents"] == 7 and result["tokens"] == sum(len(d) for d in docs)
    num_bytes = sum(len(" ".join(str(i) for i in d[:-1]).encode("utf-8")) for d in docs)
    assert result["bytes"] == num_bytes
    expected = result["loss"] * result["tokens"] / math.log(2) / num_bytes
    assert abs(result["bits_per_byte"] - expected) <= 1e-12 * expected


def _training_split_indices(prefix: str, split: str, cache: str):
    """{split name: document indices} of the datasets training builds (data/datasets.py, megatron-core)."""
    import argparse

    from megatron_cocomix.data.datasets import build_train_valid_test_datasets
    from megatron_cocomix.data.tokenizer import build_tokenizer_from_flags

    args = argparse.Namespace(seed=1234, seq_length=CONTEXT, data_cache_path=cache, reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, data_path=[prefix], split=split,
                              train_data_path=None, valid_data_path=None, test_data_path=None, mock_data=False)
    tokenizer = build_tokenizer_from_flags("NullTokenizer", vocab_size=255)
    datasets = build_train_valid_test_datasets(args, tokenizer, [8, 8, 8])
    return {name: numpy.asarray(getattr(d, "datasets", [d])[0].indices)
            for name, d in zip(("train", "valid", "test"), datasets)}


def test_split_selects_the_training_documents(exports, token_data, tmp_path):
    prefix, docs = token_data
    split = "60,25,15"
    indices = _training_split_indices(prefix, split, str(tmp_path / "cache"))
    for eval_split in ("valid", "test"):
        result = evaluate_json(["--hf-model", exports["gpt2"], "--data-path", prefix, "--split", split,
                                "--eval-split", eval_split], tmp_path, f"{eval_split}.json")["models"][0]
        expected = indices[eval_split]
        assert len(expected) > 0
        assert result["first_document"] == expected[0] and result["documents_in_split"] == len(expected)
        assert result["document_range"] == [int(expected[0]), int(expected[-1]) + 1]
        assert result["documents"] == len(expected)
        assert result["tokens"] == sum(len(docs[i]) for i in expected)
        assert result["split"] == split and result["eval_split"] == eval_split


@pytest.mark.parametrize("case", ["missing_prefix", "incomplete_checkpoint", "hf_without_config", "eval_split",
                                  "no_model", "data_name_without_data", "data_name_with_bar"])
def test_bad_inputs_one_error_line(case, token_data, exports, tmp_path):
    prefix, _ = token_data
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    args = {"missing_prefix": ["--hf-model", exports["gpt2"], "--data-path", str(tmp_path / "nothing")],
            "incomplete_checkpoint": ["--load", empty, "--data-path", prefix],
            "hf_without_config": ["--hf-model", empty, "--data-path", prefix],
            "eval_split": ["--hf-model", exports["gpt2"], "--data-path", prefix, "--eval-split", "holdout"],
            "no_model": ["--data-path", prefix],
            "data_name_without_data": ["--hf-model", exports["gpt2"], "--data-name", "OpenWebText", "--tasks", "piqa",
                                       "--task-data-dir", empty],
            "data_name_with_bar": ["--hf-model", exports["gpt2"], "--data-path", prefix, "--data-name", "OWT|2"]}[case]
    code, out, err = run_evaluate(args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert out == ""
    if case.startswith("data_name"):
        assert lines[0].startswith("error: --data-name "), lines[0]


def test_bad_input_from_the_command_line(token_data, tmp_path):
    """A fresh process (warnings on): stderr is exactly the one error line."""
    import subprocess
    import sys

    from tests.helpers.launch import test_env
    from tests.helpers.paths import ROOT

    env = test_env()
    env.pop("PYTHONWARNINGS", None)
    os.makedirs(tmp_path / "empty")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load",
                           str(tmp_path / "empty"), "--data-path", token_data[0]],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.startswith("error: --load ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
