"""A plain-torch scorer of lm-eval's zero-shot tasks for the tiny NullTokenizer test models, written from the
definitions of lm-eval 0.4's task configs (prompts, hellaswag's and winogrande's helpers) and of its metrics, with
no lm-eval code, so that what tools/evaluate.py --tasks reports can be checked against it.

Tokens: the export's tokenizer splits on whitespace and maps a word that is a token id below EOD to that id, any
other word to the unknown token EOD; the text of every test document is made of such numbers (task_data.py).

Requests (context, continuation); the continuation's tokens are scored after the context's, the input being the
last `max_length` tokens before each scored one:
- lambada_openai: the text but its last word (words split on single spaces), then " " + that word. acc: every
  continuation token is the model's argmax; perplexity: exp(- mean over documents of the word's log-likelihood).
- hellaswag: "{activity_label}: {ctx_a} {ctx_b capitalised}" and " " + each ending, all cleaned as lm-eval cleans
  HellaSwag (stripped, " [title]" -> ". ", any other [bracketed] artefact dropped, double spaces made single);
  gold = int(label).
- piqa: "Question: {goal}\\nAnswer:" and " " + each of sol1, sol2; gold = label.
- social_iqa: "Q: {context} {question}\\nA:" and " " + each of answerA..C; gold = int(label) - 1.
- arc_easy: "Question: {question}\\nAnswer:" and " " + each choice text; gold = the answerKey's position.
- winogrande (partial scoring): one context per option, the sentence up to the blank with the option filled in;
  the same continuation for both, " " + the rest of the sentence after the blank (stripped); gold = answer - 1.
Multiple choice: acc = [argmax_i ll_i == gold]; acc_norm = [argmax_i ll_i / characters(choice_i) == gold], the
characters of the choice text without the leading space (ties: the first). Averaged over documents.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from tests.helpers.evaluation_data import EOD

MULTIPLE_CHOICE = ("hellaswag", "piqa", "social_iqa", "arc_easy", "winogrande")


def word_ids(text: str) -> List[int]:
    """The NullTokenizer export's ids: a word that is a token id is that id, any other word the unknown (EOD)."""
    return [int(w) if w.isdigit() and int(w) < EOD else EOD for w in text.split()]


def _clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[[^\]]*\]", "", text)
    return text.replace("  ", " ")


def requests(task: str, doc: dict) -> Tuple[List[Tuple[str, str]], int, List[str]]:
    """([(context, continuation)] per choice (lambada: one), gold index, the choice texts acc_norm divides by)."""
    if task == "lambada_openai":
        words = doc["text"].split(" ")
        return [(" ".join(words[:-1]), " " + words[-1])], 0, []
    if task == "winogrande":
        blank = doc["sentence"].index("_")
        rest = " " + doc["sentence"][blank + 1:].strip()
        options = [doc["option1"], doc["option2"]]
        return [(doc["sentence"][:blank] + option, rest) for option in options], int(doc["answer"]) - 1, options
    if task == "hellaswag":
        context = _clean_hellaswag(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
        choices, gold = [_clean_hellaswag(e) for e in doc["endings"]], int(doc["label"])
    elif task == "piqa":
        context, choices, gold = f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"])
    elif task == "social_iqa":
        context = f"Q: {doc['context']} {doc['question']}\nA:"
        choices, gold = [doc["answerA"], doc["answerB"], doc["answerC"]], int(doc["label"]) - 1
    elif task == "arc_easy":
        context = f"Question: {doc['question']}\nAnswer:"
        choices, gold = doc["choices"]["text"], doc["choices"]["label"].index(doc["answerKey"])
    else:
        raise KeyError(task)
    return [(context, " " + choice) for choice in choices], gold, choices


class Scorer:
    """log p(continuation | context) from a model's logits: `logits(tokens [1, s]) -> [1, s, >= vocab_size]`."""

    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor], vocab_size: int, max_length: int):
        self.logits, self.vocab_size, self.max_length = logits, vocab_size, max_length

    def __call__(self, context: str, continuation: str) -> Tuple[float, bool]:
        """(sum of the continuation tokens' log-probabilities, whether each of them is the argmax)."""
        target = word_ids(continuation)
        tokens = (word_ids(context) + target)[-(self.max_length + 1):]
        with torch.no_grad():
            logits = self.logits(torch.tensor([tokens[:-1]]))[0, :, :self.vocab_size]
        log_probs = torch.log_softmax(logits.double(), dim=-1)[-len(target):]  # the rows predicting the target
        expected = torch.tensor(target)
        chosen = log_probs.gather(-1, expected[:, None]).squeeze(-1)
        return float(chosen.sum()), bool((log_probs.argmax(-1) == expected).all())

    def next_word(self, context: str) -> str:
        """The model's most likely next token after `context`, as the word that encodes it."""
        with torch.no_grad():
            logits = self.logits(torch.tensor([word_ids(context)[-self.max_length:]]))[0, -1, :self.vocab_size]
        return str(int(logits.argmax()))


def score_task(scorer: Scorer, task: str, docs: Sequence[dict]) -> Dict[str, object]:
    """lm-eval's metrics of `task` over `docs` (module docstring) and each document's log-likelihoods (one per
    choice; lambada: the target's). Multiple choice also `acc_by_tokens`: acc_norm's choice were the
    log-likelihoods divided by tokens instead of characters (a test shows that the two differ on its documents)."""
    log_likelihoods, hits, hits_norm, hits_tokens, greedy = [], [], [], [], []
    for doc in docs:
        pairs, gold, choices = requests(task, doc)
        scored = [scorer(context, continuation) for context, continuation in pairs]
        lls = [ll for ll, _ in scored]
        log_likelihoods.append(lls)
        if task == "lambada_openai":
            greedy.append(scored[0][1])
            continue
        hits.append(_first_max(lls) == gold)
        hits_norm.append(_first_max([ll / len(c) for ll, c in zip(lls, choices)]) == gold)
        tokens = [len(word_ids(continuation)) for _, continuation in pairs]
        hits_tokens.append(_first_max([ll / n for ll, n in zip(lls, tokens)]) == gold)
    out: Dict[str, object] = {"log_likelihoods": log_likelihoods}
    if task == "lambada_openai":
        out.update(acc=_mean(greedy), perplexity=math.exp(-_mean([lls[0] for lls in log_likelihoods])))
    else:
        out.update(acc=_mean(hits), acc_norm=_mean(hits_norm), acc_by_tokens=_mean(hits_tokens))
    return out


def _first_max(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _mean(values: Sequence) -> float:
    return sum(float(v) for v in values) / len(values)


def hf_scorer(hf_dir: str, max_length: int) -> Scorer:
    """The export's transformers forward (remote code: the CoCoMix class), float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    return Scorer(lambda tokens: model(input_ids=tokens, use_cache=False).logits, model.config.vocab_size,
                  max_length)


def megatron_scorer(checkpoint: str) -> Scorer:
    """The checkpoint's own megatron model (this project's model built from its saved arguments, TP1, float32):
    megatron's forward, no export involved. Needs a single-process megatron state."""
    from megatron_cocomix.conversion.checkpoint import load_checkpoint_tp1, megatron_logits

    loaded = load_checkpoint_tp1(checkpoint)
    model = loaded.model.float()
    return Scorer(lambda tokens: megatron_logits(model, tokens), int(loaded.tokenizer["vocab_size"]),
                  loaded.args.seq_length)
