"""Tokenizers shared by preprocessing (tools/preprocess_data.py) and training, so token ids always agree.

`build_tokenizer(args)` reads the Megatron tokenizer flags (`--tokenizer-type`, `--vocab-file`, `--merge-file`,
`--tokenizer-model`, `--vocab-size`) and returns an object with the interface megatron-core's GPTDataset uses:

    tokenize(text: str) -> list[int]          detokenize(ids: list[int]) -> str
    vocab_size: int (largest id + 1)          eod: int (end-of-document id appended by --append-eod)
    unique_identifiers: OrderedDict           (part of the dataset cache key)

Types:
- GPT2BPETokenizer: byte-level BPE from GPT-2's encoder.json + vocab.bpe, run by the Rust `tokenizers` library;
  eod = <|endoftext|> (50256). (megatron-core's own GPT-2 entry wraps `AutoTokenizer("gpt2")`, which needs the
  Hugging Face hub; nothing here downloads.)
- SentencePieceTokenizer: a .model file run through megatron-core's SentencePiece wrapper; eod = the model's
  </s> (eos) id, which tools/train_tokenizer.py always reserves.
- HuggingFaceTokenizer: a local tokenizer.json, or a directory holding one; eod = tokenizer_config.json's
  eos_token, else the first of <|endoftext|>, </s>, <|end_of_text|>, <eos> found in the vocabulary.
  Special tokens are never added by tokenize() (no BOS), as in Megatron's preprocessing.
- NullTokenizer: megatron-core's synthetic tokenizer; ids are the text's integers, eod = --vocab-size.

The embedding table is padded as in Megatron: padded = ceil(vocab_size / (divisible_by x TP)) x divisible_by x TP,
so each tensor-parallel shard of the vocabulary has a size divisible by --make-vocab-size-divisible-by.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import OrderedDict
from typing import Any, List, Optional, Sequence

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")

# Tried in order when a bare tokenizer.json does not say which token ends a document.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


def add_tokenizer_args(group: argparse._ActionsContainer) -> None:
    """Define the tokenizer flags (Megatron names); training and every tool call this so the flags agree."""
    group.add_argument("--tokenizer-type", default=None, choices=list(TOKENIZER_TYPES),
                       help="Tokenizer; NullTokenizer (default with --mock-data) maps ids to themselves.")
    group.add_argument("--vocab-file", default=None, help="GPT-2 BPE vocabulary (encoder.json / vocab.json).")
    group.add_argument("--merge-file", default=None, help="GPT-2 BPE merges (vocab.bpe / merges.txt).")
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece .model file, or a local Hugging Face tokenizer.json / directory holding it.")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="Vocabulary size for NullTokenizer / --mock-data (eod = this value).")


def vocab_size_with_padding(orig_vocab_size: int, make_vocab_size_divisible_by: int,
                            tensor_model_parallel_size: int) -> int:
    """Megatron's rule: round up to a multiple of divisible_by x TP so every TP shard has equal, aligned rows."""
    if orig_vocab_size <= 0:
        raise ValueError(f"vocabulary size must be positive, got {orig_vocab_size}")
    if make_vocab_size_divisible_by <= 0 or tensor_model_parallel_size <= 0:
        raise ValueError(f"--make-vocab-size-divisible-by {make_vocab_size_divisible_by} and "
                         f"--tensor-model-parallel-size {tensor_model_parallel_size} must be positive")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-orig_vocab_size // multiple) * multiple


class _TextTokenizer:
    """Common surface; subclasses set `_identity` (what makes two tokenizers produce the same ids)."""

    _identity: "OrderedDict[str, Any]"

    @property
    def unique_identifiers(self) -> "OrderedDict[str, Any]":
        return self._identity

    def tokenize(self, text: str) -> List[int]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eod(self) -> int:
        raise NotImplementedError

    # No `pad` attribute on purpose: megatron's GPTDataset masks (and zeroes) any token equal to `pad`, and none
    # of these vocabularies has a pad id that never occurs in text. Without it GPTDataset uses -1.


class _RustTokenizer(_TextTokenizer):
    """A `tokenizers.Tokenizer` (GPT-2 BPE or a Hugging Face tokenizer.json)."""

    def __init__(self, backend: Any, eod_id: int, identity: "OrderedDict[str, Any]") -> None:
        self._backend = backend
        self._eod = int(eod_id)
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self._identity = identity

    def tokenize(self, text: str) -> List[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [enc.ids for enc in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod


class GPT2BPETokenizer(_RustTokenizer):
    """GPT-2 byte-level BPE: the regex pre-split and byte->unicode map of GPT-2, no prefix space."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as e:  # the Rust error names neither flag
            raise ValueError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: not a GPT-2 BPE pair ({e})") from None
        backend = Tokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        eod = backend.token_to_id("<|endoftext|>")
        if eod is None:
            raise ValueError(f"--vocab-file {vocab_file}: no <|endoftext|> token, not a GPT-2 vocabulary")
        identity = OrderedDict(**{"class": "GPT2BPETokenizer", "vocab_file": os.path.abspath(vocab_file),
                                  "merge_file": os.path.abspath(merge_file)})
        super().__init__(backend, eod, identity)


class HuggingFaceTokenizer(_RustTokenizer):
    """A local Hugging Face fast tokenizer: tokenizer.json, or a directory with tokenizer.json."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        directory = path if os.path.isdir(path) else os.path.dirname(path)
        json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"--tokenizer-model {path}: no tokenizer.json in this directory")
        try:
            backend = Tokenizer.from_file(json_path)
        except Exception as e:
            raise ValueError(f"--tokenizer-model {json_path}: not a Hugging Face tokenizer.json ({e})") from None
        eod = _hf_eod_id(backend, directory, json_path)
        identity = OrderedDict(**{"class": "HuggingFaceTokenizer", "tokenizer_model": os.path.abspath(json_path)})
        super().__init__(backend, eod, identity)


def _hf_eod_id(backend: Any, directory: str, json_path: str) -> int:
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            eos = json.load(f).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos is not None:
            eod = backend.token_to_id(eos)
            if eod is None:
                raise ValueError(f"{config_path}: eos_token {eos!r} is not in {json_path}")
            return eod
    for candidate in _EOD_CANDIDATES:
        eod = backend.token_to_id(candidate)
        if eod is not None:
            return eod
    raise ValueError(f"--tokenizer-model {json_path}: cannot tell the end-of-document token (none of "
                     f"{', '.join(_EOD_CANDIDATES)}; add a tokenizer_config.json with eos_token)")


class SentencePieceTokenizer(_TextTokenizer):
    """A SentencePiece model through megatron-core's wrapper (no legacy special tokens: ids are the model's)."""

    def __init__(self, model_path: str) -> None:
        from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import (
            SentencePieceTokenizer as MegatronSentencePiece,
        )

        try:
            self._impl = MegatronSentencePiece(model_path, legacy=False)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"--tokenizer-model {model_path}: not a SentencePiece model ({e})") from None
        eos = self._impl.tokenizer.eos_id()
        if eos < 0:
            raise ValueError(f"--tokenizer-model {model_path}: the model has no </s> (eos) piece to end documents; "
                             f"train it with tools/train_tokenizer.py or --eos_id >= 0")
        self._eod = eos
        self._identity = OrderedDict(**{"class": "SentencePieceTokenizer",
                                        "tokenizer_model": os.path.abspath(model_path)})

    def tokenize(self, text: str) -> List[int]:
        return self._impl.text_to_ids(text)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._impl.tokenizer.encode(list(texts))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._impl.ids_to_text([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._impl.vocab_size

    @property
    def eod(self) -> int:
        return self._eod


class NullTokenizer(_TextTokenizer):
    """megatron-core's NullTokenizer: "3 1 4" -> [3, 1, 4]; vocab_size = --vocab-size + 1 (the eod id)."""

    def __init__(self, vocab_size: int) -> None:
        from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer as MegatronNull

        self._impl = MegatronNull(vocab_size)
        self._identity = OrderedDict(**{"class": "NullTokenizer", "vocab_size": int(vocab_size)})

    def tokenize(self, text: str) -> List[int]:
        return self._impl.text_to_ids(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._impl.ids_to_text([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._impl.vocab_size

    @property
    def eod(self) -> int:
        return self._impl.eod


def _existing_file(path: Optional[str], flag: str, tokenizer_type: str) -> str:
    if path is None:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    return path


def build_tokenizer_from_flags(tokenizer_type: Optional[str], vocab_file: Optional[str] = None,
                               merge_file: Optional[str] = None, tokenizer_model: Optional[str] = None,
                               vocab_size: Optional[int] = None) -> _TextTokenizer:
    """The tokenizer named by the flags; errors name the flag and the file."""
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(_existing_file(vocab_file, "--vocab-file", tokenizer_type),
                                _existing_file(merge_file, "--merge-file", tokenizer_type))
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(_existing_file(tokenizer_model, "--tokenizer-model", tokenizer_type))
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(_existing_file(tokenizer_model, "--tokenizer-model", tokenizer_type))
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size <= 0:
            raise ValueError(f"--tokenizer-type NullTokenizer needs a positive --vocab-size, got {vocab_size}")
        return NullTokenizer(vocab_size)
    raise ValueError(f"--tokenizer-type {tokenizer_type}: expected one of {', '.join(TOKENIZER_TYPES)}")


def build_tokenizer(args: argparse.Namespace) -> _TextTokenizer:
    """Build the tokenizer from the parsed flags and set `args.padded_vocab_size` (Megatron's padding rule) and
    `args.true_vocab_size` (the ids the tokenizer can produce; the padded rows above it are masked out)."""
    tokenizer = build_tokenizer_from_flags(args.tokenizer_type, getattr(args, "vocab_file", None),
                                           getattr(args, "merge_file", None), getattr(args, "tokenizer_model", None),
                                           getattr(args, "vocab_size", None))
    divisible_by = getattr(args, "make_vocab_size_divisible_by", 128)
    tp = getattr(args, "tensor_model_parallel_size", 1)
    args.padded_vocab_size = vocab_size_with_padding(tokenizer.vocab_size, divisible_by, tp)
    args.true_vocab_size = tokenizer.vocab_size
    logger.info("tokenizer %s: vocab %d padded to %d (%d dummy tokens)", args.tokenizer_type, tokenizer.vocab_size,
                args.padded_vocab_size, args.padded_vocab_size - tokenizer.vocab_size)
    return tokenizer


# Files of a Hugging Face tokenizer directory that travel with it (tokenizer.json is required; the others say which
# tokens are special and which one ends a document).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_export_state(tokenizer: _TextTokenizer) -> dict:
    """The tokenizer as plain data for a checkpoint: {type, vocab_size, eod, files: {name: bytes}}.

    Files are stored by content (GPT-2 BPE: vocab.json + merges.txt; SentencePiece: tokenizer.model; Hugging
    Face: tokenizer.json and its config files; NullTokenizer: none), so a checkpoint exports on another machine."""
    identity = tokenizer.unique_identifiers
    kind = identity["class"]
    sources = {}
    if kind == "GPT2BPETokenizer":
        sources = {"vocab.json": identity["vocab_file"], "merges.txt": identity["merge_file"]}
    elif kind == "SentencePieceTokenizer":
        sources = {"tokenizer.model": identity["tokenizer_model"]}
    elif kind == "HuggingFaceTokenizer":
        directory = os.path.dirname(identity["tokenizer_model"])
        sources = {name: os.path.join(directory, name) for name in HF_TOKENIZER_FILES}
        sources["tokenizer.json"] = identity["tokenizer_model"]
    files = {}
    for name, path in sources.items():
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = f.read()
    return {"type": kind, "vocab_size": int(tokenizer.vocab_size), "eod": int(tokenizer.eod), "files": files}
