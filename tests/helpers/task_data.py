"""Zero-shot task files for the evaluation tests: DIR/<task>/<split>.jsonl in the schema of the Hugging Face
dataset lm-eval reads for each task, a few random documents each.

The tiny test models use the NullTokenizer, whose words are decimal token ids (any other word becomes the unknown
token), so the text of every document is made of such numbers: the choices of a question then differ in their
tokens and the models' log-likelihoods tell them apart.
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, List

SPLITS = {"lambada_openai": "test", "wikitext": "test", "hellaswag": "validation", "piqa": "validation",
          "social_iqa": "validation", "arc_easy": "test", "winogrande": "validation"}


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(str(rng.randrange(0, 255)) for _ in range(rng.randint(low, high)))


def wikitext_page(rng: random.Random) -> str:
    """An article as EleutherAI/wikitext_document_level stores one: a heading " = N = " line, then paragraphs in
    WikiText's raw tokenisation (" @-@ " inside numbers, " , " and " . " spaced out) that lm-eval's
    wikitext_detokenizer joins back; some 60 to 150 words, several times the test models' 32-token context."""
    lines = [f" = {_words(rng, 1, 2)} = "]
    for _ in range(rng.randint(3, 5)):
        lines.append(f" {_words(rng, 4, 9)} @-@ {_words(rng, 2, 6)} , {_words(rng, 3, 8)} . {_words(rng, 2, 5)} ")
    return "\n".join(lines) + "\n"


def task_documents(task: str, num_docs: int, seed: int = 0) -> List[dict]:
    rng = random.Random(f"{task}-{seed}")
    docs = []
    for i in range(num_docs):
        if task == "lambada_openai":
            docs.append({"text": _words(rng, 6, 12)})
        elif task == "wikitext":
            docs.append({"page": wikitext_page(rng)})
        elif task == "hellaswag":
            # Rowan/hellaswag: the label is a string; "[title]" and "[step]" are artefacts lm-eval's helper cleans.
            docs.append({"ind": i, "activity_label": "Cooking", "ctx_a": _words(rng, 3, 6),
                         "ctx_b": _words(rng, 1, 3), "ctx": "", "endings": [_words(rng, 2, 5) for _ in range(4)],
                         "source_id": f"wikihow~{i}", "split": "val", "split_type": "indomain",
                         "label": str(rng.randrange(4))})
            docs[-1]["ctx_a"] += " [title]"
            docs[-1]["endings"][i % 4] = docs[-1]["endings"][i % 4].replace(" ", " [step] ", 1)
        elif task == "piqa":
            docs.append({"goal": _words(rng, 3, 8), "sol1": _words(rng, 2, 6), "sol2": _words(rng, 2, 6),
                         "label": rng.randrange(2)})
        elif task == "social_iqa":
            docs.append({"context": _words(rng, 4, 8), "question": _words(rng, 2, 4), "answerA": _words(rng, 1, 3),
                         "answerB": _words(rng, 1, 3), "answerC": _words(rng, 1, 3),
                         "label": str(rng.randrange(1, 4))})
        elif task == "arc_easy":
            docs.append({"id": f"arc-{i}", "question": _words(rng, 3, 8),
                         "choices": {"text": [_words(rng, 1, 4) for _ in range(4)], "label": ["A", "B", "C", "D"]},
                         "answerKey": rng.choice("ABCD")})
        elif task == "winogrande":
            docs.append({"sentence": f"{_words(rng, 2, 5)} _ {_words(rng, 2, 5)}", "option1": _words(rng, 1, 2),
                         "option2": _words(rng, 1, 2), "answer": str(rng.randrange(1, 3))})
        else:
            raise KeyError(task)
    return docs


def write_task_data(root: str, num_docs: int = 6, seed: int = 0, overrides: Dict[str, List[dict]] = None) -> dict:
    """Write every task's file under root; returns {task: (path, documents)}. `overrides` replaces the documents
    of some tasks."""
    out = {}
    for task, split in SPLITS.items():
        docs = (overrides or {}).get(task) or task_documents(task, num_docs, seed)
        path = os.path.join(root, task, f"{split}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            for doc in docs:
                f.write(json.dumps(doc) + "\n")
        out[task] = (path, docs)
    return out
