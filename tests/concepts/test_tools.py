"""tools/extract_concepts.py, train_sae.py, eval_sae.py and import_openai_sae.py on tiny random teachers.

extract_concepts: labels aligned with the training samples (compared with attribution_labels on the samples the
data pipeline builds), identical with 1 and 2 processes (torchrun, gloo), resumable, refusing mismatches.
train_sae: resumes exactly, refuses a resume that would read other windows, 2 processes (torchrun, gloo) train
the SAE 1 process trains with twice the windows per step. eval_sae: every metric equals an independent
computation (tests/helpers/sae_reference.py).
"""

import json
import os
import subprocess
import sys

import numpy
import pytest
import torch

from tests.helpers.concept_files import save_tiny_gpt2, write_openai_sae
from tests.helpers.data_files import write_token_dataset
from tests.helpers.launch import free_port
from tests.helpers.paths import ROOT

VOCAB = 96  # NullTokenizer --vocab-size 95: ids 0..94, eod 95


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("concept_tools")
    save_tiny_gpt2(str(tmp / "gpt2"), vocab_size=VOCAB)
    write_token_dataset(str(tmp / "data"), VOCAB - 1, num_docs=40)
    write_openai_sae(str(tmp / "sae.pt"), 32, 128, 8, seed=3)
    return tmp


def extract_flags(assets, output, **extra):
    flags = {"--teacher-model": assets / "gpt2", "--teacher-layer": 2, "--sae": assets / "sae.pt",
             "--data-path": assets / "data", "--split": "90,10,0", "--seq-length": 16, "--train-iters": 6,
             "--global-batch-size": 4, "--tokenizer-type": "NullTokenizer", "--vocab-size": VOCAB - 1,
             "--output-prefix": output, "--data-cache-path": assets / "cache", "--chunk-samples": 5}
    flags.update(extra)
    argv = []
    for key, value in flags.items():
        if value is not None:
            argv += [key] if value is True else [key, str(value)]
    return argv + ["--no-progress"]


def run(cmd, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def read_all(prefix):
    from megatron_cocomix.data.concept_labels import ConceptLabelsDataset

    ds = ConceptLabelsDataset(str(prefix))
    return torch.stack([ds[i] for i in range(len(ds))]), ds


@pytest.fixture(scope="module")
def one_process_labels(assets):
    out = assets / "labels_1"
    proc = run([sys.executable, "tools/extract_concepts.py"] + extract_flags(assets, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["num_samples"] == 24
    return out


def training_tokens(assets, output):
    """(parsed flags, tokenizer, tokens [24, 16]) of the training samples extract_flags(assets, output) labels."""
    import torch.distributed as dist

    from megatron_cocomix.data.datasets import build_train_valid_test_datasets
    from megatron_cocomix.data.tokenizer import build_tokenizer
    from tools import extract_concepts as tool

    args = tool.build_parser().parse_args(extract_flags(assets, output))
    tool._validate(args)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        tokenizer = build_tokenizer(args)
        train, _, _ = build_train_valid_test_datasets(args, tokenizer, [24, 0, 0])
    finally:
        dist.destroy_process_group()
    return args, tokenizer, torch.stack([torch.as_tensor(train[i]["tokens"]) for i in range(24)])


def test_labels_aligned_with_training_samples(assets, one_process_labels):
    from megatron_cocomix.concepts import attribution_labels, load_sae, load_teacher, sae_fingerprint
    from megatron_cocomix.data.concept_labels import expected_fingerprint

    labels, ds = read_all(one_process_labels)
    assert labels.shape == (24, 16, 4)
    args, tokenizer, tokens = training_tokens(assets, one_process_labels)
    teacher = load_teacher(str(assets / "gpt2"), 2)
    sae = load_sae(str(assets / "sae.pt")).freeze()
    assert torch.equal(labels, attribution_labels(teacher, sae, tokens))
    assert (labels[:, -1] == -1).all() and (labels[:, :-1] >= 0).any()
    ds.check_fingerprint(expected_fingerprint(args, tokenizer, 24, sae_fingerprint(str(assets / "sae.pt"))))
    with pytest.raises(ValueError, match="'seq_length' is 16 but this run has 32"):
        args.seq_length = 32
        ds.check_fingerprint(expected_fingerprint(args, tokenizer, 24, sae_fingerprint(str(assets / "sae.pt"))))


def test_two_processes_give_identical_labels_and_the_teacher_states(assets, one_process_labels):
    """2 processes, chunks of 3 samples: the labels of one process; the teacher states kept beside them (merged
    from the same chunks) are the teacher's final hidden states of the training samples, in order."""
    from megatron_cocomix.concepts import load_teacher
    from megatron_cocomix.data.teacher_states import TeacherStatesDataset

    out = assets / "labels_2"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "tools/extract_concepts.py"] + extract_flags(
                    assets, out, **{"--chunk-samples": 3, "--teacher-states-prefix": assets / "states_2"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, ds_a = read_all(one_process_labels)
    b, ds_b = read_all(out)
    assert torch.equal(a, b)
    assert ds_a.fingerprint == ds_b.fingerprint
    assert not os.path.exists(str(out) + ".parts")

    states = TeacherStatesDataset(str(assets / "states_2"))
    assert len(states) == 24 and states.d_model == 32
    _, _, tokens = training_tokens(assets, out)
    teacher = load_teacher(str(assets / "gpt2"), None)
    with torch.no_grad():
        expected = teacher.model.transformer(input_ids=tokens).last_hidden_state  # GPT-2: after ln_f
    torch.testing.assert_close(torch.stack([states[i] for i in range(24)]), expected, rtol=1e-5, atol=1e-6)


def test_resume_after_interruption(assets, one_process_labels, monkeypatch):
    import megatron_cocomix.concepts.labeling as labeling  # where the tool's labeler calls attribution_labels
    from tools import extract_concepts as tool

    out = assets / "labels_resume"
    calls = {"n": 0}
    real = labeling.attribution_labels

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ValueError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(labeling, "attribution_labels", failing)
    assert tool.main(extract_flags(assets, out, **{"--extract-batch-size": 2})) == 2  # crashes in chunk 2
    done = sorted(f for f in os.listdir(str(out) + ".parts") if f.endswith(".done"))
    assert done == ["chunk_000000.done"]
    calls["n"] = -1000
    assert tool.main(extract_flags(assets, out, **{"--extract-batch-size": 2})) == 0
    # Chunks of 5 samples in batches of 2: 3 calls per full chunk, 2 for the last (4 samples); chunk 0 is kept.
    assert calls["n"] == -1000 + 3 * 3 + 2
    assert torch.equal(read_all(out)[0], read_all(one_process_labels)[0])
    # A finished output with the same flags is kept; other flags are refused.
    assert tool.main(extract_flags(assets, out)) == 0
    assert tool.main(extract_flags(assets, out, **{"--concept-attribution": "abs"})) == 2


def test_extract_errors(assets, capsys, tmp_path, one_process_labels):
    from tools import extract_concepts as tool

    # Teacher states are kept for training samples only, and with labels extracted in the same run.
    assert tool.main(extract_flags(assets, tmp_path / "x", **{"--eval-split": "test",
                                                              "--teacher-states-prefix": tmp_path / "s"})) == 2
    assert "--teacher-states-prefix keeps the states of training samples" in capsys.readouterr().err
    assert tool.main(extract_flags(assets, one_process_labels, **{"--teacher-states-prefix": tmp_path / "s"})) == 2
    assert "already holds these labels, but not these teacher states" in capsys.readouterr().err
    assert not (tmp_path / "s.bin").exists()

    assert tool.main(extract_flags(assets, tmp_path / "x", **{"--global-batch-size": None})) == 2
    assert "--global-batch-size is required" in capsys.readouterr().err
    wide = tmp_path / "wide.pt"
    write_openai_sae(str(wide), 48, 128, 8)
    assert tool.main(extract_flags(assets, tmp_path / "x", **{"--sae": wide})) == 2
    assert "has d_model 48 but teacher" in capsys.readouterr().err
    assert tool.main(extract_flags(assets, tmp_path / "x", **{"--concept-dim": 4096})) == 2
    assert "num_latents 128 but --concept-dim expects 4096" in capsys.readouterr().err
    assert tool.main(extract_flags(assets, tmp_path / "x", **{"--vocab-size": 500})) == 2
    assert "the data tokenizer has 501 ids but teacher" in capsys.readouterr().err
    # Unfinished parts of another configuration are not mixed in.
    parts = tmp_path / "y.parts"
    parts.mkdir()
    (parts / "fingerprint.json").write_text(json.dumps({"seq_length": 99}))
    assert tool.main(extract_flags(assets, tmp_path / "y")) == 2
    assert "remove" in capsys.readouterr().err


def train_flags(assets, save, iters, **extra):
    flags = {"--teacher-model": assets / "gpt2", "--teacher-layer": 2, "--data-path": assets / "data",
             "--seq-length": 16, "--num-latents": 64, "--k": 4, "--train-iters": iters, "--sequences-per-step": 4,
             "--dead-tokens": 200, "--eval-sequences": 8, "--save": save, "--log-interval": 2}
    flags.update(extra)
    return [str(x) for kv in flags.items() for x in kv] + ["--no-progress"]


def test_train_sae_resume_is_exact_and_eval(assets, tmp_path, capsys):
    from megatron_cocomix.concepts import load_sae
    from tools import train_sae as tool

    assert tool.main(train_flags(assets, tmp_path / "straight", 8, **{"--save-interval": 4,
                                                                     "--tensorboard-dir": tmp_path / "tb"})) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["train_fvu_last"] < result["train_fvu_first"] and result["l0"] <= 4
    assert os.listdir(tmp_path / "tb")
    assert tool.main(train_flags(assets, tmp_path / "resumed", 4)) == 0
    assert tool.main(train_flags(assets, tmp_path / "resumed", 8)) == 0
    capsys.readouterr()
    a, b = load_sae(str(tmp_path / "straight" / "iter_0000008")), load_sae(str(tmp_path / "resumed" / "iter_0000008"))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    from tools import eval_sae as eval_tool

    assert eval_tool.main(["--sae", str(tmp_path / "straight" / "iter_0000008"), "--teacher-model",
                           str(assets / "gpt2"), "--teacher-layer", "2", "--data-path", str(assets / "data"),
                           "--seq-length", "16", "--num-sequences", "8"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["fvu"] == pytest.approx(result["fvu"], rel=1e-6)
    assert evaluated["delta_lm_loss"] == pytest.approx(result["delta_lm_loss"], rel=1e-5, abs=1e-6)
    # A checkpoint with another width is refused on resume, naming both values.
    assert tool.main(train_flags(assets, tmp_path / "straight", 12, **{"--num-latents": 32})) == 2
    assert "num_latents 64 but --num-latents/--k of this run" in capsys.readouterr().err
    # ... and so is one that would read other windows.
    assert tool.main(train_flags(assets, tmp_path / "straight", 12, **{"--sequences-per-step": 2})) == 2
    assert "resumed with sequences_per_step 4 -> 2;" in capsys.readouterr().err


def test_train_sae_two_processes_equal_one(assets, tmp_path, capsys):
    """Data parallel: 2 processes (torchrun, gloo) with 2 windows each per step read the same windows as one
    process with 4 and take the same steps (each rank's loss is its share of the whole batch's FVU and AuxK, the
    gradients are summed), AuxK included (--dead-tokens 200: latents die within the 6 steps): the same weights to
    float rounding, the same training and held-out metrics."""
    from megatron_cocomix.concepts import load_sae
    from tools import train_sae as tool

    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "tools/train_sae.py"]
               + train_flags(assets, tmp_path / "dp", 6, **{"--sequences-per-step": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.load(open(tmp_path / "dp" / "iter_0000006" / "cfg.json"))["world_size"] == 2
    assert tool.main(train_flags(assets, tmp_path / "one", 6)) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print("2 processes:", two, "\n1 process:", one)
    assert two["steps"] == one["steps"] == 6 and 0 < one["train_dead_fraction"] < 1
    a, b = load_sae(str(tmp_path / "dp" / "iter_0000006")), load_sae(str(tmp_path / "one" / "iter_0000006"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    for key in ("train_fvu_first", "train_fvu_last", "fvu", "l0", "clean_loss", "spliced_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert two["delta_lm_loss"] == pytest.approx(one["delta_lm_loss"], abs=2e-6)  # float32 losses of ~4.6
    assert two["dead_fraction"] == one["dead_fraction"] and two["train_dead_fraction"] == one["train_dead_fraction"]


def test_eval_sae_equals_independent_metrics(assets, tmp_path, capsys):
    """tools/eval_sae.py's FVU, L0, dead fraction, clean / spliced LM loss and delta LM loss equal the ones
    tests/helpers/sae_reference.py computes without the project (numpy SAE from the .pt tensors, the plain
    Hugging Face teacher, a forward hook for the splice) on the same windows: the last 8 windows of 16 tokens of
    the token stream, read here from the .bin file, evaluated in batches of 3 (the sums run over uneven batches).
    A random SAE with negative latent biases makes every number informative: some top-k activations are not
    positive (L0 < k), some latents never fire, and the splice changes the LM loss."""
    from tests.helpers import sae_reference
    from tests.helpers.concept_files import random_sae_tensors
    from tools import eval_sae

    sae = str(tmp_path / "sae.pt")
    tensors = random_sae_tensors(32, 128, seed=5)
    tensors["latent_bias"] -= 2.0
    torch.save(dict(tensors, activation="TopK", activation_state_dict={"k": 8, "postact_fn": "ReLU"}), sae)
    assert eval_sae.main(["--sae", sae, "--teacher-model", str(assets / "gpt2"), "--teacher-layer",
                          "2", "--data-path", str(assets / "data"), "--seq-length", "16", "--num-sequences", "8",
                          "--batch-size", "3", "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stream = numpy.fromfile(str(assets / "data.bin"), dtype=numpy.int32)
    count = len(stream) // 16
    windows = stream[(count - 8) * 16:count * 16].reshape(8, 16)
    expected = sae_reference.metrics(sae, str(assets / "gpt2"), 2, windows, skip=1)
    print("eval_sae:", got, "\nreference:", expected)
    assert 0 < expected["l0"] < expected["k"] and 0 < expected["dead_fraction"] < 1, expected
    assert abs(expected["delta_lm_loss"]) > 1e-3, expected
    assert got["tokens"] == expected["tokens"] == 8 * 15
    assert got["fvu"] == pytest.approx(expected["fvu"], rel=1e-5)
    assert got["l0"] == pytest.approx(expected["l0"], abs=1e-12)
    assert got["dead_fraction"] == pytest.approx(expected["dead_fraction"], abs=1e-12)
    for key in ("clean_loss", "spliced_loss"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    assert got["delta_lm_loss"] == pytest.approx(expected["delta_lm_loss"], abs=2e-5)


def test_import_openai_sae(assets, tmp_path, capsys):
    from megatron_cocomix.concepts import load_sae
    from tools import import_openai_sae as tool

    assert tool.main(["--input", str(assets / "sae.pt"), "--output", str(tmp_path / "out"), "--layer", "6"]) == 0
    x = torch.randn(5, 32)
    torch.testing.assert_close(load_sae(str(tmp_path / "out"))(x), load_sae(str(assets / "sae.pt"))(x), rtol=0, atol=0)
    assert tool.main(["--input", str(assets / "sae.pt"), "--output", str(tmp_path / "out")]) == 2
    assert "already holds an SAE" in capsys.readouterr().err
    assert tool.main(["--input", str(tmp_path / "none.pt"), "--output", str(tmp_path / "o2")]) == 2


def test_gguf_to_hf_errors(assets, tmp_path, capsys):
    """tools/gguf_to_hf.py refuses what is not a .gguf file and a non-empty --output, in one line each, and writes
    nothing. (Its conversion of the shipped SmolLM2 gguf makes the `smollm2_directory` fixture, whose logits
    tests/hf/test_import.py compares with the gguf imported by tools/convert_from_hf.py.)"""
    from tools import gguf_to_hf

    assert gguf_to_hf.main(["--model", str(assets / "gpt2"), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --model {assets / 'gpt2'}: expected a .gguf file"
    assert not (tmp_path / "out").exists()
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert gguf_to_hf.main(["--model", str(fake), "--output", str(tmp_path / "full")]) == 2
    assert "directory is not empty (add --overwrite to replace it)" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert gguf_to_hf.main(["--model", str(fake), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: --model {fake}: not a readable gguf causal LM (")
    assert not (tmp_path / "out").exists()


def test_final_states_need_the_plain_linear_head(assets):
    """Teacher.keeping_final_states records what the chunked head reads; with the model's own head (--teacher-lm-head
    full) there is no such tensor to keep, and it says so instead of yielding nothing."""
    from megatron_cocomix.concepts import load_teacher

    teacher = load_teacher(str(assets / "gpt2"), 2)
    tokens = torch.randint(0, VOCAB - 1, (2, 16), generator=torch.Generator().manual_seed(0))
    with teacher.keeping_final_states() as finals:
        teacher.hidden_and_grad(tokens)
    assert len(finals) == 1 and finals[0].shape == (2, 16, 32)
    torch.testing.assert_close(teacher.logits_from_final_states(finals[0]), teacher.logits(tokens))
    with pytest.raises(ValueError, match="--teacher-lm-head chunked"):
        with load_teacher(str(assets / "gpt2"), 2, lm_head="full").keeping_final_states():
            pass
