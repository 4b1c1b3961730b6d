"""tools/generate.py: greedy continuation from an export and from the checkpoint itself are the same text, the
one generate() gives; sampling is reproducible with --seed; bad input is one error line."""

from __future__ import annotations

import contextlib
import io

import torch

from tests.helpers.hf_checkpoints import export


def _run(argv):
    from tools import generate

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = generate.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_generate_from_export_and_checkpoint(checkpoints, export_root, single_process):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = checkpoints("tp1")["cocomix"]
    path, _ = export(checkpoint, export_root, ("tp1", "cocomix"))
    prompt = "3 1 4 1 5 9"
    code, from_export, err = _run(["--hf-model", path, "--prompt", prompt, "--max-new-tokens", "8", "--greedy"])
    assert code == 0, err
    code, from_checkpoint, err = _run(["--load", checkpoint, "--prompt", prompt, "--max-new-tokens", "8", "--greedy"])
    assert code == 0, err
    assert from_export.strip() == from_checkpoint.strip()

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=255)
    expected = tokenizer.decode(tokens[0, ids["input_ids"].shape[1]:])
    assert from_export.startswith(prompt) and expected.strip() in from_export

    sampled = [_run(["--hf-model", path, "--prompt", prompt, "--max-new-tokens", "8", "--seed", "3",
                     "--temperature", "0.9", "--top-p", "0.95"])[1] for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_generate_bad_input(tmp_path, single_process):
    code, _, err = _run(["--hf-model", str(tmp_path), "--prompt", "x"])
    assert code == 2 and err.strip().startswith("error: --hf-model") and len(err.strip().splitlines()) == 1


def test_steering_tools(checkpoints, export_root, single_process, capsys):
    """generate.py --steer and steer.py: scale 1 is the unsteered continuation; a large scale changes it; bad
    --steer values are one error line."""
    from tools import steer

    path, _ = export(checkpoints("tp1")["cocomix"], export_root, ("tp1", "cocomix"))
    prompt = "3 1 4 1 5 9"
    plain = _run(["--hf-model", path, "--prompt", prompt, "--max-new-tokens", "8", "--greedy"])[1]
    scale_one = _run(["--hf-model", path, "--prompt", prompt, "--max-new-tokens", "8", "--greedy",
                      "--steer", "7:1,30:1"])[1]
    assert scale_one == plain
    assert steer.main(["--hf-model", path, "--prompt", prompt, "--concept", "7", "--scales", "1,1000,-1000",
                       "--max-new-tokens", "8"]) == 0
    rows = [line.split(" | ", 1)[1] for line in capsys.readouterr().out.splitlines() if " | " in line]
    assert len(rows) == 3 and plain.strip().endswith(eval(rows[0]).strip()) and rows[1] != rows[0]
    for bad, message in (("7", "expected ID:SCALE"), ("100000:2", "outside 0..63")):
        code, _, err = _run(["--hf-model", path, "--prompt", prompt, "--steer", bad])
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0] and err.strip().endswith(errors[0])
