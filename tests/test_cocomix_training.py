"""A short real CoCoMix run on the shipped Shakespeare corpus (slow: about 4 minutes on 2 CPU cores).

1. tools/preprocess_data.py tokenises examples/data/shakespeare.jsonl.gz with the shipped GPT-2 BPE files.
2. The teacher is a random GPT-2-shaped model on the GPT-2 vocabulary (50257 ids, width 64, 3 blocks); a TopK
   SAE (256 latents, k 8) is trained on its hidden_states[2] with tools/train_sae.py over the same corpus.
3. A 4-layer student (hidden 64, seq 64) trains for ITERS steps of 4 sequences with CoCoMix (concept layer 2,
   top-8 concepts, online labels from the teacher + SAE), and the same student trains as plain NTP on the
   same samples (equal tokens).

Checked: lm loss and concept loss fall (mean of the first 10 iterations vs the last 10) and the SAE's FVU
fell while it trained. The measured numbers (and the CoCoMix / NTP step-time ratio) are printed; run with
`-s` to see them. benchmarks/cocomix_cpu.md records them.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.cocomix_assets import tiny_teacher
from tests.helpers.launch import MULTI_RUN_WORKER, losses, run_script
from tests.helpers.paths import ROOT

ITERS = 200
GPT2_FILES = ["--vocab-file", os.path.join(ROOT, "examples", "data", "gpt2", "encoder.json"),
              "--merge-file", os.path.join(ROOT, "examples", "data", "gpt2", "vocab.bpe")]


def student_flags(data_prefix: str, cache: str):
    return [
        "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64", "--attention-dropout", "0", "--hidden-dropout", "0",
        "--data-path", data_prefix, "--split", "969,30,1", "--data-cache-path", cache,
        "--tokenizer-type", "GPT2BPETokenizer", *GPT2_FILES, "--num-workers", "0",
        "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", str(ITERS),
        "--lr", "2e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234",
        "--log-interval", "50", "--eval-iters", "0", "--eval-interval", str(10 * ITERS),
    ]


def mean(values):
    return sum(values) / len(values)


@pytest.mark.slow
def test_cocomix_tiny_real_run(tmp_path):
    data = str(tmp_path / "shakespeare")
    run_script(os.path.join(ROOT, "tools", "preprocess_data.py"),
               ["--input", os.path.join(ROOT, "examples", "data", "shakespeare.jsonl.gz"), "--output-prefix", data,
                "--tokenizer-type", "GPT2BPETokenizer", *GPT2_FILES, "--append-eod", "--workers", "2", "--quiet"])
    data_prefix = data + "_text_document"

    teacher = tiny_teacher(vocab_size=50257, width=64, layers=3, positions=128)
    sae_dir = str(tmp_path / "sae")
    run_script(os.path.join(ROOT, "tools", "train_sae.py"),
               ["--teacher-model", teacher, "--teacher-layer", "2", "--data-path", data_prefix, "--seq-length", "64",
                "--num-latents", "256", "--k", "8", "--train-iters", "200", "--sequences-per-step", "16",
                "--save", sae_dir, "--save-interval", "100000", "--log-interval", "50", "--no-progress"])
    with open(os.path.join(sae_dir, "eval.json")) as f:
        sae_eval = json.load(f)
    assert sae_eval["train_fvu_last"] < 0.6 * sae_eval["train_fvu_first"], sae_eval
    sae = os.path.join(sae_dir, f"iter_{200:07d}")

    base = student_flags(data_prefix, str(tmp_path / "cache"))
    cocomix = base + ["--cocomix", "--concept-layer", "2", "--concept-topk", "8", "--concept-num-labels", "4",
                      "--teacher-model", teacher, "--teacher-layer", "2", "--sae", sae]
    spec, out = tmp_path / "runs.json", tmp_path / "summaries.json"
    spec.write_text(json.dumps([["ntp", "pretrain", base], ["cocomix", "pretrain", cocomix]]))
    run_script(MULTI_RUN_WORKER, [str(spec), str(out)], timeout=900)
    runs = json.loads(out.read_text())

    report = {"sae_fvu": [sae_eval["train_fvu_first"], sae_eval["train_fvu_last"]], "eval_fvu": sae_eval["fvu"]}
    for name in ("cocomix", "ntp"):
        assert runs[name]["iteration"] == ITERS
        lm = losses(runs[name])
        report[f"{name} lm loss first10/last10"] = [mean(lm[:10]), mean(lm[-10:])]
        report[f"{name} step time (s, iterations 11+)"] = mean(losses(runs[name], "time")[10:])
        assert mean(lm[-10:]) < mean(lm[:10]) - 1.0, f"{name} lm loss did not fall: {lm[:10]} ... {lm[-10:]}"
    concept = losses(runs["cocomix"], "concept loss")
    report["cocomix concept loss first10/last10"] = [mean(concept[:10]), mean(concept[-10:])]
    report["cocomix concept topk acc first10/last10"] = [
        mean(losses(runs["cocomix"], "concept topk acc")[:10]), mean(losses(runs["cocomix"], "concept topk acc")[-10:])]
    report["step time ratio cocomix/ntp"] = (report["cocomix step time (s, iterations 11+)"]
                                             / report["ntp step time (s, iterations 11+)"])
    print("\nCOCOMIX_TINY_RUN " + json.dumps(report))
    assert mean(concept[-10:]) < mean(concept[:10]) - 0.2, f"concept loss did not fall: {concept[:10]} ... {concept[-10:]}"
