"""Tokenizer files of an export: AutoTokenizer.from_pretrained(dir) gives the ids training used (no special tokens
added) and eos = the end-of-document token, for each tokenizer type a checkpoint can record."""

from __future__ import annotations

import gzip
import json

import pytest

from tests.helpers.paths import CORPUS, GPT2_MERGES, GPT2_VOCAB


@pytest.fixture(scope="module")
def texts():
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        lines = [json.loads(line)["text"] for _, line in zip(range(20), f)]
    return lines + ["  leading spaces, tabs\tand a newline\n", "unicode: café — ünïcödé ✓"]


def _round_trip(tokenizer, tmp_path, texts):
    from transformers import AutoTokenizer

    from megatron_cocomix.conversion.tokenizer_files import write_tokenizer
    from megatron_cocomix.data.tokenizer import tokenizer_export_state

    tmp_path.mkdir(exist_ok=True)
    write_tokenizer(tokenizer_export_state(tokenizer), str(tmp_path), model_max_length=128)
    exported = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in texts:
        assert exported(text, add_special_tokens=False)["input_ids"] == tokenizer.tokenize(text), text
    assert exported.eos_token_id == tokenizer.eod
    return exported


def test_gpt2_bpe(tmp_path, texts):
    from megatron_cocomix.data.tokenizer import GPT2BPETokenizer

    exported = _round_trip(GPT2BPETokenizer(GPT2_VOCAB, GPT2_MERGES), tmp_path, texts)
    assert exported.eos_token == "<|endoftext|>"
    assert exported.decode(exported("Hello world")["input_ids"]) == "Hello world"


def test_hugging_face_directory(tmp_path, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from megatron_cocomix.data.tokenizer import HuggingFaceTokenizer

    source = tmp_path / "source"
    source.mkdir()
    tok = Tokenizer(models.BPE.from_file(GPT2_VOCAB, GPT2_MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(source / "tokenizer.json"))
    _round_trip(HuggingFaceTokenizer(str(source)), tmp_path / "out", texts)


def test_sentencepiece(tmp_path, texts):
    from megatron_cocomix.data.tokenizer import SentencePieceTokenizer
    from tests.helpers.data_files import write_jsonl
    from tools import train_tokenizer

    corpus = write_jsonl(tmp_path / "slice.jsonl", texts[:20] * 3)
    assert train_tokenizer.main(["--input", corpus, "--model-prefix", str(tmp_path / "spm"), "--vocab-size", "600",
                                 "--num-threads", "2"]) == 0
    _round_trip(SentencePieceTokenizer(str(tmp_path / "spm.model")), tmp_path / "out", texts[:20])
