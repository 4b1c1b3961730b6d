"""Bad inputs found while the run is being built stop it with one `error:` line and exit status 2."""

import os

import pytest

from tests.helpers.cocomix_assets import cocomix_flags
from tests.helpers.launch import TINY_GPT, run_script
from tests.helpers.paths import ROOT

GPT2 = os.path.join(ROOT, "examples", "data", "gpt2")


@pytest.mark.parametrize("flags, message", [
    ([f for f in TINY_GPT if f not in ("--mock-data",)] + [
        "--data-path", "/nonexistent/corpus", "--tokenizer-type", "GPT2BPETokenizer",
        "--vocab-file", os.path.join(GPT2, "encoder.json"), "--merge-file", os.path.join(GPT2, "vocab.bpe")],
     "error: data prefix /nonexistent/corpus: /nonexistent/corpus.idx does not exist"),
    (TINY_GPT + cocomix_flags(teacher_layer=5), "error: --teacher-layer 5 is out of range for teacher"),
    (TINY_GPT + ["--vocab-size", "1000"] + cocomix_flags(), "error: the data tokenizer has 1001 ids but teacher"),
], ids=["missing_data", "teacher_layer", "teacher_vocabulary"])
def test_setup_error_is_one_line(flags, message):
    if "--vocab-size" in flags[len(TINY_GPT):]:  # drop TINY_GPT's own --vocab-size 255
        i = flags.index("--vocab-size")
        flags = flags[:i] + flags[i + 2:]
    proc = run_script(os.path.join(ROOT, "pretrain_cocomix.py"), flags, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[-1].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_labels_file_too_short_is_refused_before_training(tmp_path):
    """Precomputed labels for 8 samples, a run that reads 4 iterations x 8 sequences: refused at start-up."""
    import torch

    from megatron_cocomix.data.concept_labels import ConceptLabelsWriter, write_fingerprint

    prefix = str(tmp_path / "labels")
    seq_length, num_labels, num_latents, samples = 32, 4, 64, 8
    writer = ConceptLabelsWriter(prefix, seq_length, num_labels, num_latents)
    writer.add(torch.randint(0, num_latents, (samples, seq_length, num_labels)))
    writer.finalize()
    write_fingerprint(prefix, {}, seq_length, num_labels, num_latents, samples)
    flags = TINY_GPT + ["--cocomix", "--concept-layer", "2", "--concept-labels", prefix]
    proc = run_script(os.path.join(ROOT, "pretrain_cocomix.py"), flags, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: concept labels {prefix}: 8 samples but training needs 32; re-run "
                      f"tools/extract_concepts.py with the training flags"], proc.stderr[-2000:]
    assert "iteration" not in proc.stdout and "Traceback" not in proc.stderr


def test_teacher_states_of_other_samples_are_refused_before_training(tmp_path):
    """--kd-teacher-states whose fingerprint is not this run's stops the run at start-up with one line naming the
    file and the first key that differs."""
    import torch

    from megatron_cocomix.data.teacher_states import TeacherStatesWriter, write_states_fingerprint

    prefix = str(tmp_path / "states")
    writer = TeacherStatesWriter(prefix, 32, 32)
    writer.add(torch.randn(32, 32, 32))
    writer.finalize()
    flags = cocomix_flags()
    teacher = flags[flags.index("--teacher-model"):flags.index("--teacher-layer") + 2]
    write_states_fingerprint(prefix, {"seed": 999}, 32, 32, 32)
    proc = run_script(os.path.join(ROOT, "pretrain_cocomix.py"),
                      TINY_GPT + ["--kd", *teacher, "--kd-teacher-states", prefix], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: teacher states {prefix}: fingerprint has no "), errors
    assert "iteration" not in proc.stdout and "Traceback" not in proc.stderr
