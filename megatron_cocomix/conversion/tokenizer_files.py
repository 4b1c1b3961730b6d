"""Tokenizer files of an export, from the tokenizer state a checkpoint saves (data/tokenizer.py's
`tokenizer_export_state`): {type, vocab_size, eod, files}. AutoTokenizer.from_pretrained(export) then gives the
ids training used (no special tokens added; eos = the end-of-document token).

- GPT2BPETokenizer: vocab.json + merges.txt -> tokenizer.json (byte-level BPE, no prefix space, as training).
- HuggingFaceTokenizer: its tokenizer.json (and config files) copied; eos_token set to the eod token.
- SentencePieceTokenizer: tokenizer.model copied, read by transformers' LlamaTokenizer (no BOS / EOS added; a
  leading "▁" only when the model adds one).
- NullTokenizer: a word-level tokenizer.json whose tokens are the decimal ids ("3 1 4" -> [3, 1, 4]), as training.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional


def tokenizer_state_from_flags(tokenizer_type: Optional[str], vocab_file=None, merge_file=None,
                               tokenizer_model=None, vocab_size=None) -> Optional[dict]:
    """The same state, for a checkpoint that does not carry one, from the Megatron tokenizer flags."""
    if tokenizer_type is None:
        return None
    from megatron_cocomix.data.tokenizer import build_tokenizer_from_flags, tokenizer_export_state

    return tokenizer_export_state(build_tokenizer_from_flags(tokenizer_type, vocab_file, merge_file,
                                                             tokenizer_model, vocab_size))


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def write_tokenizer(state: dict, output: str, model_max_length: int) -> None:
    """Write the tokenizer files of `state` into the directory `output`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    kind, files, eod = state["type"], state["files"], state["eod"]
    config = {"model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    if kind == "GPT2BPETokenizer":
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("vocab.json", "merges.txt"):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(files[name])
            backend = Tokenizer(models.BPE.from_file(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        token = backend.id_to_token(eod)
        backend.add_special_tokens([token])
        backend.save(os.path.join(output, "tokenizer.json"))
        config.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=token, bos_token=token, unk_token=token)
    elif kind == "HuggingFaceTokenizer":
        for name, content in files.items():
            with open(os.path.join(output, name), "wb") as f:
                f.write(content)
        token = Tokenizer.from_file(os.path.join(output, "tokenizer.json")).id_to_token(eod)
        path = os.path.join(output, "tokenizer_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                config = {**json.load(f), **config}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config["eos_token"] = token
    elif kind == "SentencePieceTokenizer":
        with open(os.path.join(output, "tokenizer.model"), "wb") as f:
            f.write(files["tokenizer.model"])
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_proto=files["tokenizer.model"])
        # The model's own normaliser decides whether text gets a leading "▁" (add_dummy_prefix); transformers'
        # LlamaTokenizer must do the same, or the first token of every text differs.
        dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
        config.update(tokenizer_class="LlamaTokenizer", add_bos_token=False, add_eos_token=False, legacy=True,
                      add_prefix_space=dummy_prefix, eos_token=sp.id_to_piece(eod))
    elif kind == "NullTokenizer":
        vocab = {str(i): i for i in range(state["vocab_size"])}
        backend = Tokenizer(models.WordLevel(vocab, unk_token=str(eod)))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
        backend.add_special_tokens([str(eod)])
        backend.save(os.path.join(output, "tokenizer.json"))
        config.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=str(eod), unk_token=str(eod))
    else:
        raise ValueError(f"--tokenizer-type {kind}: cannot export this tokenizer")
    # Batches with (left) padding need a pad token; training has none, the end-of-document token serves.
    config.setdefault("pad_token", config["eos_token"])
    _write_json(os.path.join(output, "tokenizer_config.json"), config)
