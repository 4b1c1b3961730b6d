"""tools/evaluate.py --tasks: lm-eval's zero-shot tasks on local JSON-lines files.

- every shipped task runs on a tiny CoCoMix export (remote code), offline (any connection off this machine is
  refused and recorded), with lm-eval's metrics in [0, 1] and a finite LAMBADA perplexity; --limit is lm-eval's;
- PIQA's accuracies and every choice's log-likelihood equal a plain-torch computation (the prompt
  "Question: {goal}\\nAnswer:", the continuations " {sol}", tokens read off the NullTokenizer's words by hand),
  for a checkpoint (through its export) and its HF export, in a Table 1 with the held-out perplexity and the
  tokens the checkpoint was trained on;
- LAMBADA (last-word accuracy, perplexity), HellaSwag (acc, acc_norm, lm-eval's cleaning), SIQA, ARC-Easy
  (acc, acc_norm) and WinoGrande (partial scoring), and every document's log-likelihoods, equal the plain-torch
  scorer of tests/helpers/zero_shot_reference.py: for an export on its logits, and for a checkpoint (--load) on
  the logits of megatron's own forward, not on the export the tool goes through;
- WikiText's word perplexity, byte perplexity and bits per byte, and each article's log-likelihood, equal a
  plain-torch rolling log-likelihood (every token predicted once, chunk by chunk of the context, lm-eval's word
  count of the raw article), in a Table 1 with both perplexity columns (--data-name OpenWebText, WikiText);
- missing or malformed task files and unknown tasks: one `error:` line, before any model is loaded.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy
import pytest
import torch

from tests.helpers import zero_shot_reference
from tests.helpers.evaluation_data import CONTEXT, EOD, run_evaluate
from tests.helpers.task_data import SPLITS, task_documents, write_task_data

ALL_TASKS = "lambada_openai,wikitext,hellaswag,piqa,social_iqa,arc_easy,winogrande"


def test_every_task_runs_on_an_export(exports, tmp_path, no_network):
    data = str(tmp_path / "tasks")
    write_task_data(data, num_docs=6)
    out_json, out_md = str(tmp_path / "zs.json"), str(tmp_path / "zs.md")
    code, out, err = run_evaluate(["--hf-model", exports["cocomix"], "--name", "cocomix", "--tasks", ALL_TASKS,
                               "--task-data-dir", data, "--limit", "5", "--output-json", out_json,
                               "--output-md", out_md])
    assert code == 0, err[-3000:]
    assert no_network == [], no_network
    print("\n" + out)
    with open(out_md) as f:
        assert f.read() == out
    with open(out_json) as f:
        report = json.load(f)
    settings = report["settings"]["zero_shot"]
    assert settings["num_fewshot"] == 0 and settings["limit"] == 5
    for task, split in SPLITS.items():
        assert settings["tasks"][task]["data_file"] == os.path.join(data, task, f"{split}.jsonl")
        assert settings["tasks"][task]["documents"] == 6
    row = report["models"][0]
    assert row["kind"] == "hf" and row["tokens_seen"] is None and row["max_length"] == 32
    results = row["tasks"]
    assert list(results) == ALL_TASKS.split(",")
    for task, numbers in results.items():
        assert numbers["documents"] == 5, task
        if task == "wikitext":  # perplexities only
            continue
        accuracies = [numbers[m] for m in ("acc", "acc_norm") if m in numbers]
        assert accuracies and all(0.0 <= a <= 1.0 for a in accuracies), (task, numbers)
        assert numbers["acc_stderr"] is not None, task
    assert set(results["hellaswag"]) >= {"acc", "acc_norm"} and set(results["winogrande"]) >= {"acc"}
    # A random 256-token model: the target word's perplexity is finite and far above 1.
    assert math.isfinite(results["lambada_openai"]["perplexity"]) and results["lambada_openai"]["perplexity"] > 10
    assert set(results["wikitext"]) >= {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert results["wikitext"]["word_perplexity"] > results["wikitext"]["byte_perplexity"] > 1
    table1 = [results["lambada_openai"]["acc"], results["hellaswag"]["acc_norm"], results["piqa"]["acc"],
              results["social_iqa"]["acc"], results["arc_easy"]["acc"], results["winogrande"]["acc"]]
    assert abs(row["average_acc"] - sum(table1) / 6) < 1e-12
    header, _, cells = out.splitlines()
    columns = ["model", "parameters", "tokens seen", "LAMBADA ppl", "LAMBADA acc %", "WikiText ppl",
               "HellaSwag acc_norm %", "PIQA acc %", "SIQA acc %", "ARC-Easy acc %", "WinoGrande acc %",
               "average acc %"]
    assert header == "| " + " | ".join(columns) + " |"
    values = [c.strip() for c in cells.strip("|").split("|")]
    assert values[0] == "cocomix" and values[2] == "-"
    assert values[3] == f"{results['lambada_openai']['perplexity']:.2f}"
    assert values[5] == f"{results['wikitext']['word_perplexity']:.2f}"
    assert values[6:] == [f"{100 * a:.2f}" for a in table1[1:]] + [f"{100 * row['average_acc']:.2f}"]


def _word_ids(text: str) -> list:
    """The NullTokenizer export's ids: a word that is a token id is that id, any other word the unknown (EOD)."""
    return [int(w) if w.isdigit() and int(w) < EOD else EOD for w in text.split()]


def reference_piqa(hf_dir: str, docs) -> dict:
    """acc and acc_norm of lm-eval's PIQA, computed here: sum of log p(continuation tokens | prompt) per choice;
    acc takes the largest, acc_norm the largest per character of the choice. Also the log-likelihoods."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hits, hits_norm, log_likelihoods = 0, 0, []
    for doc in docs:
        context = _word_ids(f"Question: {doc['goal']}\nAnswer:")
        scores = []
        for sol in (doc["sol1"], doc["sol2"]):
            continuation = _word_ids(f" {sol}")
            tokens = torch.tensor([context + continuation])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=tokens[:, :-1]).logits[0].double(), -1)
            positions = range(len(context) - 1, tokens.shape[1] - 1)
            scores.append(sum(float(logp[p, tokens[0, p + 1]]) for p in positions))
        log_likelihoods.append(scores)
        lengths = [len(doc["sol1"]), len(doc["sol2"])]
        hits += int(max(range(2), key=lambda i: scores[i]) == doc["label"])
        hits_norm += int(max(range(2), key=lambda i: scores[i] / lengths[i]) == doc["label"])
    return {"acc": hits / len(docs), "acc_norm": hits_norm / len(docs), "log_likelihoods": log_likelihoods}


def test_piqa_accuracy_equals_plain_torch(tiny_checkpoints, exports, token_data, tmp_path, no_network):
    """A checkpoint (exported on the fly) and its export score PIQA as the reference; an odd number of documents
    so that swapped choices could not give the same accuracy. The Table 1 rows carry the held-out perplexity and
    the checkpoint's tokens seen (2 iterations x 8 sequences x 32 tokens)."""
    docs = task_documents("piqa", 9, seed=3)
    data = str(tmp_path / "tasks")
    write_task_data(data, num_docs=2, overrides={"piqa": docs})
    out_json = str(tmp_path / "piqa.json")
    code, out, err = run_evaluate(["--load", tiny_checkpoints["gpt2"], "--hf-model", exports["gpt2"],
                               "--name", "ckpt", "export", "--data-path", token_data[0], "--tasks", "piqa",
                               "--task-data-dir", data, "--output-json", out_json])
    assert code == 0, err[-3000:]
    assert no_network == [], no_network
    print("\n" + out)
    with open(out_json) as f:
        rows = json.load(f)["models"]
    expected = reference_piqa(exports["gpt2"], docs)
    assert 0 < expected["acc"] < 1, expected  # both outcomes occur: the comparison is not trivial
    for row in rows:
        piqa = row["tasks"]["piqa"]
        assert piqa["documents"] == len(docs)
        assert piqa["acc"] == pytest.approx(expected["acc"], abs=1e-12), (row["name"], piqa, expected)
        assert piqa["acc_norm"] == pytest.approx(expected["acc_norm"], abs=1e-12), (row["name"], piqa, expected)
    assert rows[0]["kind"] == "checkpoint" and rows[0]["tokens_seen"] == 2 * 8 * 32 and rows[0]["iteration"] == 2
    assert rows[0]["parameters"] == rows[1]["parameters"]
    header, _, first, second = out.splitlines()
    assert header.startswith("| model | parameters | tokens seen | held-out ppl | PIQA acc % | average acc % |")
    assert first.startswith(f"| ckpt | {rows[0]['parameters'] / 1e3:.2f}K | 512 | {rows[0]['ppl']:.2f} |")
    assert second.startswith("| export | ") and " | - | " in second
    # Each choice's log-likelihood as lm-eval computed it: the prompt and the continuation are the reference's.
    from megatron_cocomix.evaluation import zero_shot

    tasks = zero_shot.check_tasks("piqa", data)
    model = zero_shot.load_model("hf", exports["gpt2"])
    report = zero_shot.evaluate(model, tasks, bootstrap_iters=0, progress=False, log_likelihoods=True)
    assert report["tasks"]["piqa"]["acc"] == rows[1]["tasks"]["piqa"]["acc"]
    assert numpy.allclose(report["log_likelihoods"]["piqa"], expected["log_likelihoods"], rtol=0, atol=1e-4)


REFERENCE_TASKS = ("lambada_openai", "hellaswag", "social_iqa", "arc_easy", "winogrande")


@pytest.fixture(scope="module")
def five_tasks(tiny_checkpoints, exports, tmp_path_factory):
    """One tools/evaluate.py run of the CoCoMix checkpoint (--load, scored through its in-memory export) and of its
    export (--hf-model) on LAMBADA, HellaSwag, SIQA, ARC-Easy and WinoGrande, 7 documents each; lm-eval's
    log-likelihoods of every document and choice are captured from that same run. Every other LAMBADA text ends
    with the export's most likely next word, so that its accuracy is not 0. Returns (documents per task, the JSON
    rows, [per-document log-likelihoods per task] per model)."""
    from megatron_cocomix.evaluation import zero_shot

    export_scorer = zero_shot_reference.hf_scorer(exports["cocomix"], CONTEXT)
    docs = {task: task_documents(task, 7, seed=7) for task in REFERENCE_TASKS}
    for doc in docs["lambada_openai"][::2]:
        context = doc["text"].rsplit(" ", 1)[0]
        doc["text"] = f"{context} {export_scorer.next_word(context)}"
    root = tmp_path_factory.mktemp("five_tasks")
    data, out_json = str(root / "tasks"), str(root / "five.json")
    write_task_data(data, num_docs=2, overrides=docs)
    captured, evaluate = [], zero_shot.evaluate

    def keep_log_likelihoods(*args, **kwargs):
        report = evaluate(*args, **dict(kwargs, log_likelihoods=True))
        captured.append(report.pop("log_likelihoods"))
        return report

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zero_shot, "evaluate", keep_log_likelihoods)
        code, out, err = run_evaluate(["--load", tiny_checkpoints["cocomix"], "--hf-model", exports["cocomix"],
                                       "--name", "ckpt", "export", "--tasks", ",".join(REFERENCE_TASKS),
                                       "--task-data-dir", data, "--bootstrap-iters", "0", "--output-json", out_json])
    assert code == 0, err[-3000:]
    print("\n" + out)
    with open(out_json) as f:
        rows = json.load(f)["models"]
    assert [row["kind"] for row in rows] == ["checkpoint", "hf"] and len(captured) == 2
    return docs, rows, captured


def _check_against_reference(row: dict, log_likelihoods: dict, scorer, docs: dict) -> dict:
    """Each task's metrics in the row equal the reference's, and lm-eval's log-likelihood of every document and
    choice equals the reference's to 1e-4; returns the reference's numbers."""
    expected = {}
    for task in REFERENCE_TASKS:
        reference = expected[task] = zero_shot_reference.score_task(scorer, task, docs[task])
        numbers = row["tasks"][task]
        assert numbers["documents"] == len(docs[task]), (row["name"], task)
        got = log_likelihoods[task]
        assert [len(lls) for lls in got] == [len(lls) for lls in reference["log_likelihoods"]], (row["name"], task)
        assert numpy.allclose(numpy.concatenate(got), numpy.concatenate(reference["log_likelihoods"]), rtol=0,
                              atol=1e-4), (row["name"], task, got, reference["log_likelihoods"])
        for metric in ("acc", "acc_norm"):
            if metric in reference and metric in numbers:
                assert numbers[metric] == pytest.approx(reference[metric], abs=1e-12), (row["name"], task, metric)
        if task == "lambada_openai":
            assert numbers["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4), (row["name"], numbers)
    assert set(row["tasks"]["hellaswag"]) >= {"acc", "acc_norm"} and "acc_norm" in row["tasks"]["arc_easy"]
    return expected


def test_five_tasks_export_equals_plain_torch(five_tasks, exports):
    """The export's LAMBADA (last-word accuracy, perplexity), HellaSwag (acc, acc_norm, lm-eval's cleaning), SIQA,
    ARC-Easy (acc, acc_norm) and WinoGrande (partial scoring) equal the plain-torch reference on the export's
    logits. The documents make the comparison able to fail: every accuracy is strictly between 0 and 1, and
    HellaSwag's and ARC-Easy's acc_norm differs from their acc and from what dividing by tokens instead of
    characters would give."""
    docs, rows, captured = five_tasks
    scorer = zero_shot_reference.hf_scorer(exports["cocomix"], CONTEXT)
    expected = _check_against_reference(rows[1], captured[1], scorer, docs)
    # These hold for the documents of seed 7 and the tiny models of the fixtures; should the models change, pick
    # the seed of task_documents in five_tasks again so that they hold.
    for task, reference in expected.items():
        assert 0 < reference["acc"] < 1, (task, reference)
    for task in ("hellaswag", "arc_easy"):
        assert expected[task]["acc_norm"] not in (expected[task]["acc"], expected[task]["acc_by_tokens"]), task


def test_five_tasks_checkpoint_equals_megatron_forward(five_tasks, tiny_checkpoints, single_process):
    """The checkpoint's row (tools/evaluate.py --load: lm-eval on its in-memory export) equals the plain-torch
    reference on the logits of megatron's own forward of the checkpoint, so a fault in the export would show."""
    docs, rows, captured = five_tasks
    scorer = zero_shot_reference.megatron_scorer(tiny_checkpoints["cocomix"])
    assert scorer.vocab_size == EOD + 1 and scorer.max_length == CONTEXT
    _check_against_reference(rows[0], captured[0], scorer, docs)


def reference_wikitext(hf_dir: str, pages, context: int) -> dict:
    """lm-eval's wikitext metrics computed here: each article detokenised (the marks task_data.wikitext_page
    writes, joined back as WikiText's detokeniser does), its tokens read off the NullTokenizer's words, every token
    predicted once: chunk by chunk of `context` tokens, the first after the EOD token (the export's only special
    token), each later one by the `context`-token window that ends just before its last token. Words and bytes are
    counted in the raw article, as lm-eval counts them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    log_likelihoods, words, num_bytes = [], 0, 0
    for page in pages:
        assert " @-@ " in page and " , " in page and " \n" in page  # the detokeniser has work to do
        text = page.replace(" @-@ ", "-").replace(" , ", ", ").replace(" . ", ". ")
        text = text.replace(" \n", "\n").replace("\n ", "\n")
        ids = [EOD] + _word_ids(text)
        n = len(ids) - 1  # tokens to predict: ids[1:]
        assert n > 2 * context and n % context  # several windows, the last one partial
        total = 0.0
        for start in range(0, n, context):
            end = min(start + context, n)
            first = max(0, end - context)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids[first:end]])).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            total += sum(float(logp[p - first, ids[p + 1]]) for p in range(start, end))
        log_likelihoods.append(total)
        words += len(re.split(r"\s+", page))
        num_bytes += len(page.encode("utf-8"))
    total = sum(log_likelihoods)
    return {"log_likelihoods": log_likelihoods, "word_perplexity": math.exp(-total / words),
            "byte_perplexity": math.exp(-total / num_bytes), "bits_per_byte": -total / num_bytes / math.log(2)}


def test_wikitext_word_perplexity_equals_plain_torch(exports, token_data, tmp_path, no_network):
    """lm-eval's wikitext task on a local test.jsonl scores as the reference; with --data-path under --data-name
    the Table 1 row carries both perplexity columns."""
    docs = task_documents("wikitext", 5, seed=7)
    data = str(tmp_path / "tasks")
    write_task_data(data, num_docs=2, overrides={"wikitext": docs})
    out_json = str(tmp_path / "wikitext.json")
    code, out, err = run_evaluate(["--hf-model", exports["gpt2"], "--name", "export", "--data-path", token_data[0],
                                   "--data-name", "OpenWebText", "--tasks", "wikitext", "--task-data-dir", data,
                                   "--output-json", out_json])
    assert code == 0, err[-3000:]
    assert no_network == [], no_network
    print("\n" + out)
    with open(out_json) as f:
        report = json.load(f)
    row = report["models"][0]
    wikitext = row["tasks"]["wikitext"]
    expected = reference_wikitext(exports["gpt2"], [d["page"] for d in docs], context=32)
    assert wikitext["documents"] == len(docs)
    assert wikitext["word_perplexity"] == pytest.approx(expected["word_perplexity"], rel=1e-4), (wikitext, expected)
    assert wikitext["byte_perplexity"] == pytest.approx(expected["byte_perplexity"], rel=1e-4)
    assert wikitext["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], abs=1e-4)
    assert row["data_name"] == report["settings"]["data_name"] == "OpenWebText"
    assert report["settings"]["zero_shot"]["tasks"]["wikitext"]["source"].startswith(
        "EleutherAI/wikitext_document_level")
    header, _, cells = out.splitlines()
    assert header == "| model | parameters | tokens seen | OpenWebText ppl | WikiText ppl | average acc % |"
    assert cells == (f"| export | {row['parameters'] / 1e3:.2f}K | - | {row['ppl']:.2f} | "
                     f"{expected['word_perplexity']:.2f} | - |")
    # Each article's rolling log-likelihood as lm-eval computed it.
    from megatron_cocomix.evaluation import zero_shot

    model = zero_shot.load_model("hf", exports["gpt2"])
    numbers = zero_shot.evaluate(model, zero_shot.check_tasks("wikitext", data), bootstrap_iters=0, progress=False,
                                 log_likelihoods=True)
    got = [ll for (ll,) in numbers["log_likelihoods"]["wikitext"]]
    assert numpy.allclose(got, expected["log_likelihoods"], rtol=0, atol=1e-4), (got, expected["log_likelihoods"])


@pytest.mark.parametrize("case", ["missing_dir", "missing_files", "unknown_task", "no_data_dir", "missing_field",
                                  "not_json", "nothing_to_do"])
def test_bad_task_inputs_one_error_line(case, exports, tmp_path, monkeypatch):
    from megatron_cocomix.evaluation import lm, zero_shot

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(zero_shot, "load_model", no_model)
    monkeypatch.setattr(lm, "load_hf", no_model)
    data = str(tmp_path / "tasks")
    write_task_data(data, num_docs=2)
    args = ["--hf-model", exports["gpt2"], "--tasks", "piqa,hellaswag", "--task-data-dir", data]
    if case == "missing_dir":
        args[-1] = str(tmp_path / "nowhere")
        expected = [f"piqa needs {tmp_path}/nowhere/piqa/validation.jsonl (not found",
                    f"hellaswag needs {tmp_path}/nowhere/hellaswag/validation.jsonl (not found"]
    elif case == "missing_files":
        os.remove(os.path.join(data, "hellaswag", "validation.jsonl"))
        args[3] = "piqa,hellaswag,lambada_openai,wikitext"
        os.remove(os.path.join(data, "lambada_openai", "test.jsonl"))
        os.remove(os.path.join(data, "wikitext", "test.jsonl"))
        expected = [f"hellaswag needs {data}/hellaswag/validation.jsonl (not found",
                    f"lambada_openai needs {data}/lambada_openai/test.jsonl (not found",
                    "EleutherAI/lambada_openai",
                    f"wikitext needs {data}/wikitext/test.jsonl (not found; the test split of "
                    f"EleutherAI/wikitext_document_level wikitext-2-raw-v1 as JSON lines)"]
    elif case == "unknown_task":
        args[3] = "piqa,mmlu"
        expected = ["mmlu", "supported: lambada_openai, wikitext, hellaswag, piqa, social_iqa, arc_easy, "
                            "winogrande"]
    elif case == "no_data_dir":
        args = args[:-2]
        expected = ["--tasks needs --task-data-dir"]
    elif case == "missing_field":
        with open(os.path.join(data, "piqa", "validation.jsonl"), "a") as f:
            f.write(json.dumps({"goal": "1 2", "sol1": "3", "label": 0}) + "\n")
        expected = [f"{data}/piqa/validation.jsonl line 3: no field sol2"]
    elif case == "not_json":
        with open(os.path.join(data, "hellaswag", "validation.jsonl"), "a") as f:
            f.write("{not json\n")
        expected = [f"{data}/hellaswag/validation.jsonl line 3: not JSON"]
    else:
        args = args[:2]
        expected = ["--data-path", "--tasks"]
    code, out, err = run_evaluate(args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert out == ""
