"""tools/describe_latents.py against a brute-force loop over the same tokens, on a tiny random GPT-2 teacher and
TopK SAE: per latent the firing count, mean and largest activation, top tokens and top contexts (positions, token
ids, the latent's activation on each context token) equal those of a Python loop over every window, position and
active latent, computed from the Hugging Face model's own hidden states and the SAE's weights as stored; a latent
that cannot fire is listed as dead. One process (in this process) and two (torchrun, gloo) give the same records;
the HTML page is well formed and self-contained; bad input is one error line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser

import numpy
import pytest
import torch

from tests.helpers.cocomix_assets import tiny_sae, tiny_teacher
from tests.helpers.data_files import write_token_dataset
from tests.helpers.launch import launch_command, test_env
from tests.helpers.paths import ROOT

VOCAB = 256  # the tiny teacher's; data ids 0..254
SEQ, SKIP, TOP, WIDTH, TOP_TOKENS = 16, 1, 5, 3, 4
LAYER, DEAD = 1, 5
TOOL = os.path.join(ROOT, "tools", "describe_latents.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(teacher with a word-level tokenizer of the ids, SAE with latent DEAD unable to fire, data prefix, docs)."""
    from megatron_cocomix.concepts import load_sae, save_saelens
    from megatron_cocomix.conversion.tokenizer_files import write_tokenizer

    tmp = tmp_path_factory.mktemp("describe_latents")
    teacher = str(tmp / "teacher")
    shutil.copytree(tiny_teacher(), teacher)
    write_tokenizer({"type": "NullTokenizer", "vocab_size": VOCAB, "eod": VOCAB - 1, "files": {}}, teacher, 64)
    sae = load_sae(tiny_sae())
    with torch.no_grad():
        sae.W_enc[DEAD] = 0
        sae.latent_bias[DEAD] = -100.0  # its pre-activation is -100 on every token: never active
    save_saelens(sae, str(tmp / "sae"))
    docs = write_token_dataset(str(tmp / "data"), VOCAB - 1, num_docs=12, min_len=20, max_len=60, seed=1)
    return teacher, str(tmp / "sae"), str(tmp / "data"), docs, tmp


def _argv(assets, output, html=None):
    teacher, sae, data, _, _ = assets
    argv = ["--teacher-model", teacher, "--teacher-layer", str(LAYER), "--sae", sae, "--data-path", data,
            "--seq-length", str(SEQ), "--batch-size", "3", "--skip-positions", str(SKIP), "--top-contexts", str(TOP),
            "--context-tokens", str(WIDTH), "--top-tokens", str(TOP_TOKENS), "--output", str(output), "--no-progress"]
    return argv + (["--html", str(html)] if html else [])


def _run(argv):
    from tools import describe_latents

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = describe_latents.main(argv)
    return code, out.getvalue(), err.getvalue()


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def brute_force(assets):
    """Per latent: fired, sum, max, token counts and every (activation, window, position), by plain loops."""
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    teacher, sae, _, docs, _ = assets
    stream = numpy.concatenate([d.numpy() for d in docs]).astype(numpy.int64)
    windows = torch.from_numpy(stream[: len(stream) // SEQ * SEQ].reshape(-1, SEQ))
    model = GPT2LMHeadModel.from_pretrained(teacher).eval()
    weights = load_file(os.path.join(sae, "sae_weights.safetensors"))  # SAELens: W_enc [d, C], b_dec [d]
    k = json.load(open(os.path.join(sae, "cfg.json")))["k"]
    acts = {}
    with torch.no_grad():
        for w in range(windows.shape[0]):
            h = model(windows[w: w + 1], output_hidden_states=True).hidden_states[LAYER][0].double()
            xc = h - h.mean(-1, keepdim=True)
            xn = xc / (xc.std(-1, keepdim=True) + 1e-5)
            pre = (xn - weights["b_dec"].double()) @ weights["W_enc"].double() + weights["b_enc"].double()
            values, latents = pre.topk(k, dim=-1)
            for p in range(SKIP, SEQ):
                for v, c in zip(values[p].tolist(), latents[p].tolist()):
                    if v > 0:
                        acts[(c, w, p)] = v
    latents = {}
    for (c, w, p), v in acts.items():
        entry = latents.setdefault(c, {"fired": 0, "sum": 0.0, "max": 0.0, "tokens": Counter(), "all": []})
        entry["fired"] += 1
        entry["sum"] += v
        entry["max"] = max(entry["max"], v)
        entry["tokens"][int(windows[w, p])] += 1
        entry["all"].append((v, w, p))
    return latents, acts, windows


def _check_against(records, expected, acts, windows):
    num_windows = windows.shape[0]
    assert len(records) == 64 and [r["index"] for r in records] == list(range(64))
    for record in records:
        c = record["index"]
        assert record["tokens"] == num_windows * (SEQ - SKIP)
        if c not in expected:
            assert record["dead"] and record["fired"] == 0 and not record["contexts"] and not record["top_tokens"]
            assert record["description"].startswith("dead"), record
            continue
        e = expected[c]
        assert not record["dead"] and record["fired"] == e["fired"], c
        assert record["frequency"] == pytest.approx(e["fired"] / record["tokens"])
        assert record["mean_activation"] == pytest.approx(e["sum"] / e["fired"], rel=1e-4, abs=1e-5)
        assert record["max_activation"] == pytest.approx(e["max"], rel=1e-4, abs=1e-5)
        tokens = sorted(e["tokens"].items(), key=lambda item: (-item[1], item[0]))[:TOP_TOKENS]
        assert [(t["id"], t["count"]) for t in record["top_tokens"]] == tokens, c
        assert record["description"].startswith(" / ".join(str(t) for t, _ in tokens[:3]) + " ("), record
        top = sorted(e["all"], key=lambda item: (-item[0], item[1] * SEQ + item[2]))[:TOP]
        assert [(x["window"], x["position"]) for x in record["contexts"]] == [(w, p) for _, w, p in top], c
        for context, (v, w, p) in zip(record["contexts"], top):
            first, last = max(0, p - WIDTH), min(SEQ, p + WIDTH + 1)
            assert context["activation"] == pytest.approx(v, rel=1e-4, abs=1e-5)
            assert context["ids"] == windows[w, first:last].tolist() and context["highlight"] == p - first
            assert [t.strip() for t in context["tokens"]] == [str(i) for i in context["ids"]]
            around = [acts.get((c, w, q), 0.0) for q in range(first, last)]
            assert context["activations"] == pytest.approx(around, rel=1e-4, abs=1e-5), (c, w, p)


@pytest.fixture(scope="module")
def one_process(assets):
    output, page = assets[4] / "one.jsonl", assets[4] / "one.html"
    code, out, err = _run(_argv(assets, output, page))
    assert code == 0 and err == "", err
    summary = json.loads(out.strip().splitlines()[-1])
    return _read(output), summary, page.read_text(encoding="utf-8")


def test_records_equal_a_brute_force_loop(assets, one_process):
    expected, acts, windows = brute_force(assets)
    records, summary, _ = one_process
    assert DEAD not in expected and len(expected) > 40  # the random SAE's other latents fire
    _check_against(records, expected, acts, windows)
    assert summary["dead"] == 64 - len(expected) and summary["tokens"] == windows.shape[0] * (SEQ - SKIP)
    from megatron_cocomix.concepts.inspection import load_latent_descriptions

    described = load_latent_descriptions(str(assets[4] / "one.jsonl"), 64)
    assert described == {r["index"]: r["description"] for r in records}


def test_two_processes_give_the_same_records(assets, one_process):
    """torchrun --nproc_per_node 2: each rank reads every other window; rank 0 merges. Warnings on: stderr clean."""
    output = assets[4] / "two.jsonl"
    env = test_env()
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(launch_command(TOOL, _argv(assets, output), nproc=2), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["world_size"] == 2
    records = _read(output)
    for one, two in zip(one_process[0], records):
        assert [(c["window"], c["position"]) for c in one["contexts"]] == \
            [(c["window"], c["position"]) for c in two["contexts"]]
        assert (one["fired"], one["top_tokens"], one["description"]) == (two["fired"], two["top_tokens"],
                                                                          two["description"])
        assert two["mean_activation"] == pytest.approx(one["mean_activation"], rel=1e-5)


class _Page(HTMLParser):
    VOID = {"meta", "br"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.cards, self.max_tokens = [], [], [], []
        self._in_max = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "section" and attrs.get("class") == "card":
            self.cards.append(int(attrs["id"].split("-")[1]))
            self.max_tokens.append([])
        self._in_max = tag == "span" and "max" in (attrs.get("class") or "").split()

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)
        self._in_max = False

    def handle_data(self, data):
        if self._in_max:
            self.max_tokens[-1].append(data)


def test_page_has_one_card_per_live_latent_and_is_self_contained(one_process):
    records, _, content = one_process
    page = _Page()
    page.feed(content)
    page.close()
    assert not page.errors and not page.stack, (page.errors, page.stack)
    live = [r for r in records if not r["dead"]]
    assert page.cards == [r["index"] for r in live]
    for record, shown in zip(live, page.max_tokens):  # the outlined token of each context is its max token
        assert shown == [c["tokens"][c["highlight"]] for c in record["contexts"]], record["index"]
    for needle in ("http", "<script", "<link", "<img", "@import", "url(", "src="):
        assert needle not in content.lower(), needle
    # Dead latents listed, each with its anchor (so a link to any latent's card lands on the page).
    dead = [r["index"] for r in records if r["dead"]]
    anchored = ", ".join(f'<span id="latent-{c}">{c}</span>' for c in dead)
    assert f"Dead latents (no activation on the tokens read): {anchored}" in content
    assert dead == [DEAD]


def _one_error(argv, *matches):
    code, out, err = _run(argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (code, err)
    assert all(match in err for match in matches), err


def test_bad_input_is_one_error_line(assets):
    teacher, sae, data, _, tmp = assets
    base = _argv(assets, tmp / "bad.jsonl")

    def replaced(flag, value):
        argv = list(base)
        argv[argv.index(flag) + 1] = value
        return argv

    _one_error(replaced("--data-path", str(tmp / "missing")), str(tmp / "missing"))
    _one_error(replaced("--sae", tiny_sae(d_model=16)), "d_model")
    _one_error(replaced("--teacher-model", tiny_teacher(vocab_size=128)), "token id", "outside the vocabulary")
    _one_error(replaced("--output", str(tmp / "no" / "such.jsonl")), "--output", "not a file in an existing directory")
    _one_error(base + ["--max-tokens", "8"], "--max-tokens 8 is less than one window")
    _one_error(base + ["--eval-split", "test", "--split", "a,b,c"], "--split 'a,b,c'")
    assert not (tmp / "bad.jsonl").exists()
