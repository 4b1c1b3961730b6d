"""tools/inspect_concepts.py on the tiny CoCoMix export / checkpoint of the Hugging Face tests: the table lists every
token with the top N of concept logits computed here by hand, the teacher labels are the training labeler's, latent
descriptions replace ids, the HTML page is well formed and self-contained, and bad input is one error line."""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import html
import io
import json
import re
from html.parser import HTMLParser

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.cocomix_assets import TEACHER_LAYER, tiny_sae, tiny_teacher
from tests.helpers.hf_checkpoints import export

TEXT = "3 1 4 1 5 9 2 6 5 3 5"  # the tiny students' NullTokenizer: every token is its decimal id
CONCEPTS = 64  # the tiny SAE's latents
ROW = re.compile(r"^\s*\d+ \| ")
ENTRY = re.compile(r"^(\*?)(?:(.+) \[(\d+)\]|(\d+)) (-?\d+\.\d{3})$")


@pytest.fixture(scope="module")
def cocomix_export(checkpoints, export_root, single_process):
    return export(checkpoints("tp1")["cocomix"], export_root, ("tp1", "cocomix"))[0]


def _run(argv):
    from tools import inspect_concepts

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = inspect_concepts.main(argv)
    return code, out.getvalue(), err.getvalue()


def _table(out):
    """[(token text, [(marked, description, id, logit)], [(marked, description, id)] or None)] per row."""
    rows = []
    for line in out.splitlines():
        if not ROW.match(line):
            continue
        cells = line.split(" | ")
        predicted = []
        for entry in cells[2].strip().split("  "):
            match = ENTRY.match(entry)
            assert match, entry
            star, described, described_id, plain_id, logit = match.groups()
            predicted.append((star == "*", described, int(described_id or plain_id), float(logit)))
        labels = None
        if len(cells) > 3:
            labels = []
            for entry in cells[3].strip().split("  "):
                if entry != "-":
                    match = re.match(r"^(\*?)(?:(.+) \[(\d+)\]|(\d+))$", entry)
                    labels.append((match.group(1) == "*", match.group(2), int(match.group(3) or match.group(4))))
        rows.append((json.loads(cells[1].strip()), predicted, labels))
    return rows


def _tokens(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][0], tokenizer


def reference_concept_logits(path, tokens):
    """z [t, C] by hand: the export's own code (its copy of the class) up to block L-1, then the SAE layer norm
    and the predictor."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    captured = []
    block = model.transformer.h[model.config.insert_layer_idx - 1]
    block.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        model(input_ids=tokens[None], use_cache=False)
        h = captured[0][0]
        mu = h.mean(-1, keepdim=True)
        xn = (h - mu) / ((h - mu).std(-1, keepdim=True, unbiased=True) + 1e-5)
        predictor = model.transformer.concept_predictor
        return F.linear(xn - model.transformer.pre_bias, predictor.weight, predictor.bias)


def _assert_top(rows, reference, top):
    values, ids = reference.topk(top, dim=-1)
    for i, (_, predicted, _) in enumerate(rows):
        assert [entry[2] for entry in predicted] == ids[i].tolist(), i
        assert all(abs(entry[3] - v) <= 5e-4 + 1e-6 for entry, v in zip(predicted, values[i].tolist())), i


def test_table_lists_every_token_with_its_top_concepts(cocomix_export, checkpoints):
    tokens, tokenizer = _tokens(cocomix_export)
    reference = reference_concept_logits(cocomix_export, tokens)
    code, out, err = _run(["--hf-model", cocomix_export, "--text", TEXT, "--top", "3"])
    assert code == 0, err
    rows = _table(out)
    assert len(rows) == tokens.numel() and "".join(row[0] for row in rows) == tokenizer.decode(tokens)
    assert [row[0].strip() for row in rows] == [str(i) for i in tokens.tolist()]
    _assert_top(rows, reference, 3)
    # The checkpoint itself, converted in memory: the same concepts (logits to the export's 1e-4).
    code, out, err = _run(["--load", checkpoints("tp1")["cocomix"], "--text", TEXT])
    assert code == 0, err
    _assert_top(_table(out), reference, 5)


def _training_labels(tokens):
    """The labels the training step computes for these tokens (concepts/labeling.py's OnlineTeacher)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_cocomix.concepts.labeling import OnlineTeacher

    if not dist.is_initialized():
        dist.init_process_group("gloo")  # a world of one: the single_process fixture's environment
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    args = argparse.Namespace(teacher_model=tiny_teacher(), teacher_layer=TEACHER_LAYER, sae=tiny_sae(),
                              teacher_dtype="fp32", teacher_lm_head="chunked", concept_num_labels=4,
                              concept_attribution="act", concept_label_masking="ignore")
    return OnlineTeacher(args, torch.device("cpu")).concept_labels(tokens[None])[0]


class _Checker(HTMLParser):
    VOID = {"meta", "br"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_teacher_labels_are_the_training_labels_and_the_page_is_self_contained(cocomix_export, tmp_path):
    tokens, _ = _tokens(cocomix_export)
    page = tmp_path / "concepts.html"
    code, out, err = _run(["--hf-model", cocomix_export, "--text", TEXT, "--teacher-model", tiny_teacher(),
                           "--teacher-layer", str(TEACHER_LAYER), "--sae", tiny_sae(), "--html", str(page)])
    assert code == 0, err
    rows = _table(out)
    assert len(rows) == tokens.numel()
    expected = _training_labels(tokens)
    assert (expected[:-1] != -1).any() and (expected[-1] == -1).all()
    marks = 0
    for i, (_, predicted, labels) in enumerate(rows):
        assert [label[2] for label in labels] == [c for c in expected[i].tolist() if c != -1], i
        both = {entry[2] for entry in predicted} & {label[2] for label in labels}
        assert all(entry[0] == (entry[2] in both) for entry in predicted)
        assert all(label[0] == (label[2] in both) for label in labels)
        marks += bool(both)
    hits = re.search(r"among their top 5: (\d+) of (\d+) labelled", out)
    assert hits and int(hits.group(1)) == marks and int(hits.group(2)) == int((expected != -1).any(-1).sum())

    content = page.read_text(encoding="utf-8")
    checker = _Checker()
    checker.feed(content)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    for needle in ("http", "<script", "<link", "<img", "@import", "url(", "src="):
        assert needle not in content.lower(), needle
    text = "".join(checker.text)
    assert all(html.escape(row[0]) in content and row[0] in text for row in rows)
    assert content.count('class="tok') == len(rows) and "softmax probability" in content
    # Each token's colour is the softmax probability of its top concept.
    alphas = [float(a) for a in re.findall(r'class="tok[^"]*" style="background-color: rgba\([\d, ]+, ([\d.]+)\)"',
                                           content)]
    expected_alpha = torch.softmax(reference_concept_logits(cocomix_export, tokens), -1).max(-1).values
    assert len(alphas) == len(rows) and all(abs(a - e) <= 5e-4 + 1e-6 for a, e in zip(alphas, expected_alpha.tolist()))


def _descriptions(tmp_path):
    words = {i: f"word{i} & <b>" for i in range(CONCEPTS)}  # markup in a description is text, escaped
    as_dict = tmp_path / "d.json"
    as_dict.write_text(json.dumps({str(i): w for i, w in words.items()}))
    as_list = tmp_path / "explanations.jsonl.gz"  # an explorer's export: one object per line, index as a string
    with gzip.open(as_list, "wt") as f:
        for i, w in words.items():
            f.write(json.dumps({"modelId": "tiny", "index": str(i), "description": w}) + "\n")
    as_csv = tmp_path / "d.csv"
    with open(as_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "description"])
        writer.writerows(words.items())
    return words, [as_dict, as_list, as_csv]


def test_latent_descriptions_replace_ids(cocomix_export, tmp_path):
    tokens, _ = _tokens(cocomix_export)
    plain = _table(_run(["--hf-model", cocomix_export, "--text", TEXT])[1])
    words, files = _descriptions(tmp_path)
    for path in files:
        page = tmp_path / f"{path.name}.html"
        code, out, err = _run(["--hf-model", cocomix_export, "--text", TEXT, "--latent-descriptions", str(path),
                               "--html", str(page)])
        assert code == 0, (path, err)
        rows = _table(out)
        assert len(rows) == tokens.numel()
        for described, bare in zip(rows, plain):
            assert [(e[1], e[2]) for e in described[1]] == [(words[e[2]], e[2]) for e in bare[1]], path
        content = page.read_text(encoding="utf-8")
        assert html.escape(words[plain[0][1][0][2]]) in content and "<b>" not in content


def _one_error(argv, *matches):
    code, out, err = _run(argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and err.strip() == errors[0], (code, out, err)
    assert all(match in errors[0] for match in matches), errors[0]


def test_bad_inputs_are_one_error_line(cocomix_export, checkpoints, export_root, tmp_path):
    ntp_export = export(checkpoints("tp1")["gpt2"], export_root, ("tp1", "gpt2"))[0]
    _one_error(["--hf-model", ntp_export, "--text", TEXT], "has no concept head")
    _one_error(["--load", checkpoints("tp1")["gpt2"], "--text", TEXT], "NTP checkpoint has no concept head")
    base = ["--hf-model", cocomix_export, "--text", TEXT]
    bad = {"d.json": ("{not json", "not valid JSON"),
           "d.csv": ("latent,words\n1,x\n", "expected a header with an id"),
           "d.txt": ("1 x", "expected a .json, .jsonl or .csv"),
           "far.json": (json.dumps({"70000": "x"}), "latent 70000 is outside the model's concepts 0..63"),
           "bad_id.json": (json.dumps([{"index": "x1", "description": "y"}]), "latent id 'x1' is not an integer")}
    for name, (content, match) in bad.items():
        (tmp_path / name).write_text(content)
        _one_error(base + ["--latent-descriptions", str(tmp_path / name)], f"--latent-descriptions {tmp_path / name}",
                   match)
    # A teacher that cannot read the student's 256 token ids.
    _one_error(base + ["--teacher-model", tiny_teacher(vocab_size=128), "--teacher-layer", "1", "--sae", tiny_sae()],
               "the teacher must share the student's tokenizer")
    _one_error(base + ["--teacher-model", tiny_teacher()], "--teacher-model needs --teacher-layer and --sae")
    _one_error(base + ["--top", "65"], "--top 65: the model has 64 concepts")
    _one_error(base + ["--latents-page", "latents.html"], "--latents-page links the --html page's concept ids")
