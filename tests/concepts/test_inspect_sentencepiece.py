"""tools/inspect_concepts.py with a student whose tokenizer is a real one (SentencePiece, exported as
tools/convert_to_hf.py writes it) and teacher labels: a teacher with the same tokenizer gives training's labels; a
teacher with another tokenizer is refused in one line. (The NullTokenizer students of test_inspect_concepts.py
compare vocabulary sizes only, so they never reach the tokenizer comparison.)"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import re

import pytest
import torch

from tests.helpers.cocomix_assets import tiny_sae
from tests.helpers.data_files import write_jsonl
from tests.helpers.paths import CORPUS

VOCAB = 600
WIDTH = 32
CONCEPTS = 64
TEXT = "To be, or not to be: that is the question."


def _sentencepiece_directory(tmp_path, name: str, texts) -> str:
    """A SentencePiece model trained by tools/train_tokenizer.py, written as an export's tokenizer files."""
    from megatron_cocomix.conversion.tokenizer_files import write_tokenizer
    from megatron_cocomix.data.tokenizer import SentencePieceTokenizer, tokenizer_export_state
    from tools import train_tokenizer

    corpus = write_jsonl(tmp_path / f"{name}.jsonl", texts)
    prefix = tmp_path / name
    assert train_tokenizer.main(["--input", corpus, "--model-prefix", str(prefix), "--vocab-size", str(VOCAB),
                                 "--model-type", "bpe", "--num-threads", "1"]) == 0
    directory = tmp_path / f"{name}_hf"
    directory.mkdir()
    write_tokenizer(tokenizer_export_state(SentencePieceTokenizer(f"{prefix}.model")), str(directory), 64)
    return str(directory)


def _copy_tokenizer(source: str, target: str) -> None:
    import shutil

    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(f"{source}/{name}", f"{target}/{name}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(student export, teacher with the student's tokenizer, teacher with another tokenizer, SAE)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from megatron_cocomix.hf import CoCoMixConfig, CoCoMixForCausalLM

    tmp = tmp_path_factory.mktemp("inspect_spm")
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(12), f)]
    ours = _sentencepiece_directory(tmp, "ours", texts[:6])
    other = _sentencepiece_directory(tmp, "other", texts[6:])  # the same size, other pieces

    torch.manual_seed(0)
    student = tmp / "student"
    config = CoCoMixConfig(vocab_size=VOCAB, n_positions=64, n_embd=WIDTH, n_layer=2, n_head=2, concept_dim=CONCEPTS,
                           insert_layer_idx=1, concept_num=4)
    CoCoMixForCausalLM(config).save_pretrained(student)
    _copy_tokenizer(ours, student)
    teachers = []
    for name, tokenizer in (("teacher", ours), ("other_teacher", other)):
        path = tmp / name
        GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=WIDTH, n_layer=2, n_head=2)
                        ).save_pretrained(path)
        _copy_tokenizer(tokenizer, path)
        teachers.append(str(path))
    return str(student), teachers[0], teachers[1], tiny_sae(d_model=WIDTH, num_latents=CONCEPTS)


def _run(argv):
    from tools import inspect_concepts

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = inspect_concepts.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_same_tokenizer_gives_training_labels(models):
    from transformers import AutoTokenizer

    from megatron_cocomix.concepts.labeling import AttributionLabeler

    student, teacher, _, sae = models
    code, out, err = _run(["--hf-model", student, "--text", TEXT, "--teacher-model", teacher, "--teacher-layer", "1",
                           "--sae", sae, "--top", "3"])
    assert code == 0 and err == "", err
    ids = AutoTokenizer.from_pretrained(student)(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 5
    expected = AttributionLabeler(teacher, 1, sae, num_labels=4)(ids)[0]
    rows = [line.split(" | ") for line in out.splitlines() if re.match(r"^\s*\d+ \| ", line)]
    assert len(rows) == ids.shape[1]
    for row, labels in zip(rows, expected.tolist()):
        shown = [int(entry.lstrip("*")) for entry in row[3].split() if entry != "-"]
        assert shown == [c for c in labels if c != -1], row


def test_teacher_with_another_tokenizer_is_one_error_line(models):
    student, _, other_teacher, sae = models
    code, out, err = _run(["--hf-model", student, "--text", TEXT, "--teacher-model", other_teacher,
                           "--teacher-layer", "1", "--sae", sae])
    assert code == 2 and out == "", (code, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: teacher {other_teacher} tokenises "), err
    assert "the teacher must share the student's tokenizer" in err
    # The size-only comparison (--no-tokenizer-check) lets it through: the vocabularies have the same size.
    code, _, err = _run(["--hf-model", student, "--text", TEXT, "--teacher-model", other_teacher,
                         "--teacher-layer", "1", "--sae", sae, "--no-tokenizer-check"])
    assert code == 0, err
