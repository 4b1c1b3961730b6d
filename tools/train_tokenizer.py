"""Train a SentencePiece tokenizer on a corpus, for use with `--tokenizer-type SentencePieceTokenizer`.

    python tools/train_tokenizer.py --input examples/data/shakespeare.jsonl.gz --model-prefix out/spm \
        --vocab-size 8000 --model-type bpe

Reads the same inputs as tools/preprocess_data.py (.jsonl/.json/.txt, .gz/.zst, files, globs, directories; the
--json-keys fields of each JSON line, or whole .txt files) and writes {model_prefix}.model / .vocab.

Defaults are chosen so that detokenize(tokenize(text)) == text for any text, which Megatron-style document
packing relies on: identity normalisation (no NFKC), whitespace kept as is (newlines and runs of spaces are
pieces), byte fallback for characters never seen in training, no dummy prefix space, digits split. Ids:
<unk> 0, <s> 1, </s> 2 (the end-of-document token), no <pad> (megatron-core pads with -1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Iterator, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.data.corpus import is_text_file, open_binary, resolve_inputs  # noqa: E402
from megatron_cocomix.errors import cli_main  # noqa: E402


def iter_texts(files: Sequence[str], json_keys: Sequence[str], bar=None) -> Iterator[str]:
    """The documents' texts; lines that are not JSON objects with string values are skipped. `bar` (tqdm) counts
    the input bytes read (compressed bytes for .gz/.zst)."""
    for path in files:
        raw, stream = open_binary(path)
        done = 0
        with raw, stream:
            if is_text_file(path):
                text = stream.read().decode("utf-8", errors="replace")
                if bar is not None:
                    bar.update(raw.tell())
                yield text
                continue
            for line in stream:
                if bar is not None:
                    position = raw.tell()
                    bar.update(position - done)
                    done = position
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(record, dict):
                    for key in json_keys:
                        if isinstance(record.get(key), str) and record[key].strip():
                            yield record[key]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a SentencePiece model on a jsonl/txt corpus.",
                                     allow_abbrev=False)
    parser.add_argument("--input", nargs="+", required=True, help="Files, globs or directories (as preprocess_data).")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys holding the text.")
    parser.add_argument("--model-prefix", required=True, help="Writes {prefix}.model and {prefix}.vocab.")
    parser.add_argument("--vocab-size", type=int, default=32000, help="Number of pieces, special tokens included.")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece algorithm.")
    parser.add_argument("--character-coverage", type=float, default=1.0,
                        help="Fraction of characters covered by pieces; the rest fall back to bytes.")
    parser.add_argument("--max-sentences", type=int, default=2_000_000,
                        help="Sample at most this many lines (SentencePiece's input_sentence_size).")
    parser.add_argument("--max-sentence-length", type=int, default=16384,
                        help="Longer training lines are cut (bytes).")
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1, help="Training threads.")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the sentence sampling.")
    parser.add_argument("--no-progress", action="store_true",
                        help="No tqdm progress bar while the corpus is read (SentencePiece's training has none).")
    return parser


def train(args: argparse.Namespace) -> str:
    import sentencepiece

    if args.vocab_size < 260:
        raise ValueError(f"--vocab-size {args.vocab_size}: must be >= 260 (256 byte pieces + specials)")
    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--model-prefix {args.model_prefix}: directory {out_dir} does not exist")
    files = resolve_inputs(args.input)
    from tqdm import tqdm

    # SentencePiece trains on lines, so documents are fed line by line; "\n" is a user-defined piece, which
    # makes a newline inside a document one id at encoding time.
    with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=out_dir, delete=False, encoding="utf-8") as f, \
            tqdm(total=sum(os.path.getsize(p) for p in files), unit="B", unit_scale=True, desc="read corpus",
                 disable=args.no_progress) as bar:
        corpus = f.name
        count = 0
        for text in iter_texts(files, args.json_keys, bar):
            for line in text.splitlines():
                if line.strip():
                    f.write(line + "\n")
                    count += 1
            bar.set_postfix(lines=count, refresh=False)
    try:
        if count == 0:
            raise ValueError(f"--input {' '.join(args.input)}: no text found")
        sentencepiece.set_random_generator_seed(args.seed)
        sentencepiece.SentencePieceTrainer.train(
            input=corpus, model_prefix=args.model_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
            character_coverage=args.character_coverage, input_sentence_size=args.max_sentences,
            shuffle_input_sentence=True, max_sentence_length=args.max_sentence_length, seed_sentencepiece_size=1000000,
            num_threads=args.num_threads, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {str(e).splitlines()[0]}") from None
    finally:
        os.remove(corpus)
    return args.model_prefix + ".model"


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    path = train(args)
    print(f"wrote {path} ({args.vocab_size} pieces) and {args.model_prefix}.vocab")
    return 0


if __name__ == "__main__":
    sys.exit(main())
