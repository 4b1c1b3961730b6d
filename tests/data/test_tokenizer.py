"""Tokenizers: GPT-2 ids against a plain BPE reference, padding rule, each type's round trip, flag parity."""

import argparse
import json
from functools import lru_cache

import pytest
import regex

from megatron_cocomix.data.tokenizer import (
    add_tokenizer_args,
    build_tokenizer,
    build_tokenizer_from_flags,
    vocab_size_with_padding,
)
from tests.helpers.paths import GPT2_MERGES, GPT2_VOCAB

TRICKY = ["Hello world", "  two  spaces\n\nand\ttabs ", "It's we'll they've I'M", "naïve café — “quotes” 😀 日本語",
          "digits 1234567 and 3.14", "<|endoftext|> is text here", ""]


class ReferenceGPT2:
    """GPT-2's published algorithm written out plainly: regex pre-split, bytes -> printable unicode, greedy
    lowest-rank pair merges."""

    PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self):
        with open(GPT2_VOCAB) as f:
            self.encoder = json.load(f)
        with open(GPT2_MERGES, encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
            list(range(ord("®"), ord("ÿ") + 1))
        chars, extra = printable[:], 0
        for b in range(256):
            if b not in printable:
                printable.append(b)
                chars.append(256 + extra)
                extra += 1
        self.byte_to_char = {b: chr(c) for b, c in zip(printable, chars)}

    @lru_cache(maxsize=None)
    def bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
        return tuple(parts)

    def encode(self, text):
        ids = []
        for piece in self.PATTERN.findall(text):
            word = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[p] for p in self.bpe(word)]
        return ids


def test_gpt2_ids_match_reference_bpe(corpus_texts):
    tok = build_tokenizer_from_flags("GPT2BPETokenizer", GPT2_VOCAB, GPT2_MERGES)
    ref = ReferenceGPT2()
    for text in TRICKY + [corpus_texts[0][:3000], corpus_texts[400][:3000]]:
        assert tok.tokenize(text) == ref.encode(text), text[:40]
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.vocab_size == 50257 and tok.eod == 50256
    assert tok.tokenize("Hello world") == [15496, 995]  # GPT-2's well-known ids


@pytest.mark.parametrize("orig,divisible,tp,expected", [(50257, 128, 1, 50304), (50257, 128, 2, 50432),
                                                          (50304, 128, 1, 50304), (601, 8, 4, 608), (1, 128, 1, 128)])
def test_vocab_size_with_padding(orig, divisible, tp, expected):
    padded = vocab_size_with_padding(orig, divisible, tp)
    assert padded == expected
    assert padded >= orig and padded % (divisible * tp) == 0 and padded - orig < divisible * tp


def test_build_tokenizer_sets_padded_vocab_size():
    args = argparse.Namespace(tokenizer_type="GPT2BPETokenizer", vocab_file=GPT2_VOCAB, merge_file=GPT2_MERGES,
                              tokenizer_model=None, vocab_size=None, make_vocab_size_divisible_by=128,
                              tensor_model_parallel_size=2)
    tok = build_tokenizer(args)
    assert args.padded_vocab_size == 50432 and tok.vocab_size == 50257


def test_sentencepiece_round_trip_and_eod(spm_model, corpus_texts):
    import sentencepiece

    tok = build_tokenizer_from_flags("SentencePieceTokenizer", tokenizer_model=spm_model)
    own = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    for text in TRICKY + [corpus_texts[100][:2000]]:
        ids = tok.tokenize(text)
        assert ids == own.encode(text)
        assert tok.detokenize(ids) == text
    assert tok.eod == own.eos_id() == 2 and tok.vocab_size == 600


def test_huggingface_file_and_directory(hf_tokenizer_dir, corpus_texts):
    from tokenizers import Tokenizer

    own = Tokenizer.from_file(f"{hf_tokenizer_dir}/tokenizer.json")
    for path in (hf_tokenizer_dir, f"{hf_tokenizer_dir}/tokenizer.json"):
        tok = build_tokenizer_from_flags("HuggingFaceTokenizer", tokenizer_model=path)
        for text in TRICKY + [corpus_texts[5][:2000]]:
            assert tok.tokenize(text) == own.encode(text, add_special_tokens=False).ids
            assert tok.detokenize(tok.tokenize(text)) == text
        assert tok.eod == 50256 and tok.vocab_size == 50257


def test_huggingface_eod_from_tokenizer_config(hf_tokenizer_dir, tmp_path):
    import shutil

    shutil.copy(f"{hf_tokenizer_dir}/tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "!"}}))
    assert build_tokenizer_from_flags("HuggingFaceTokenizer", tokenizer_model=str(tmp_path)).eod == 0
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in"):
        build_tokenizer_from_flags("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))


def test_null_tokenizer():
    tok = build_tokenizer_from_flags("NullTokenizer", vocab_size=100)
    assert tok.tokenize("3 1 4") == [3, 1, 4] and tok.detokenize([3, 1, 4]) == "3 1 4"
    assert tok.eod == 100 and tok.vocab_size == 101


@pytest.mark.parametrize("flags,message", [
    (dict(tokenizer_type="GPT2BPETokenizer", merge_file=GPT2_MERGES), "needs --vocab-file"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/nonexistent/encoder.json", merge_file=GPT2_MERGES),
     r"--vocab-file /nonexistent/encoder.json: no such file"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file=GPT2_MERGES, merge_file=GPT2_VOCAB), "not a GPT-2 BPE pair"),
    (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=GPT2_VOCAB), "not a SentencePiece model"),
    (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=GPT2_VOCAB), "not a Hugging Face tokenizer.json"),
    (dict(tokenizer_type="NullTokenizer"), "needs a positive --vocab-size"),
    (dict(tokenizer_type="BertTokenizer"), "expected one of"),
])
def test_bad_tokenizer_flags(flags, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_tokenizer_from_flags(**flags)


def test_tool_flags_equal_training_flags():
    from megatron_cocomix.arguments import build_parser

    tool = argparse.ArgumentParser()
    add_tokenizer_args(tool)
    tool_flags = {a.option_strings[0]: (a.default, tuple(a.choices or ())) for a in tool._actions if a.option_strings
                  and a.option_strings[0] != "-h"}
    train = {a.option_strings[0]: (a.default, tuple(a.choices or ())) for a in build_parser()._actions
             if a.option_strings}
    assert set(tool_flags) == {"--tokenizer-type", "--vocab-file", "--merge-file", "--tokenizer-model", "--vocab-size"}
    for flag, spec in tool_flags.items():
        assert train[flag] == spec
