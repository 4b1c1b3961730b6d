"""A LAMBADA-format last-word task from the shipped corpus's test documents, for evaluate.py --tasks lambada_openai.

    python benchmarks/shakespeare_lambada.py --output-dir task_data --split 90,5,5 --eval-split test
    python tools/evaluate.py --load ... --tasks lambada_openai --task-data-dir task_data

Writes OUTPUT_DIR/lambada_openai/test.jsonl: one {"text": passage} per line, lm-eval's lambada_openai schema. The
passages are consecutive runs of --words whitespace-separated words of the documents that --split gives to
--eval-split (the same documents, in the corpus's order, that the pipeline's preprocessing indexed), with
whitespace collapsed and the last word's trailing punctuation removed; the task scores the model's prediction of
that last word. This is not LAMBADA (whose passages were chosen so the last word needs the broad context); it
exercises the same task definition, prompts and metrics on text the students never trained on.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import string
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data",
                      "shakespeare.jsonl.gz")


def passages(texts, words_per_passage: int, limit: int):
    out = []
    for text in texts:
        words = text.split()
        for begin in range(0, len(words) - words_per_passage + 1, words_per_passage):
            chunk = words[begin:begin + words_per_passage]
            chunk[-1] = chunk[-1].rstrip(string.punctuation)
            if chunk[-1] and chunk[-1].isalpha():
                out.append(" ".join(chunk))
            if len(out) == limit:
                return out
    return out


def main() -> int:
    from megatron_cocomix.evaluation.lm import split_range

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--split", default="90,5,5")
    parser.add_argument("--eval-split", default="test", choices=["valid", "test"])
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--limit", type=int, default=500)
    args = parser.parse_args()
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    begin, end = split_range(len(texts), args.split, args.eval_split)
    rows = passages(texts[begin:end], args.words, args.limit)
    os.makedirs(os.path.join(args.output_dir, "lambada_openai"), exist_ok=True)
    path = os.path.join(args.output_dir, "lambada_openai", "test.jsonl")
    with open(path, "w") as f:
        for text in rows:
            f.write(json.dumps({"text": text}) + "\n")
    print(f"wrote {path}: {len(rows)} passages from documents [{begin}, {end})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
