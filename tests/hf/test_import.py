"""tools/convert_from_hf.py: Hugging Face -> checkpoint -> Hugging Face is bit-identical (GPT-2, Llama with GQA and
untied head), the imported model's loss in this stack equals transformers' loss, and the shipped SmolLM2-135M
.gguf imports (slow)."""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch

from tests.helpers.cocomix_assets import GPT2_VOCAB, tiny_teacher
from tests.helpers.hf_checkpoints import convert
from tests.helpers.paths import GPT2_MERGES
from tests.helpers.paths import GPT2_VOCAB as GPT2_VOCAB_FILE


def import_hf(argv):
    from tools import convert_from_hf

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = convert_from_hf.main(argv)
    return code, out.getvalue(), err.getvalue()


# One row more than the GPT-2 tokenizer's 50257 tokens (as models padded for their own tensor parallelism are): the
# vocabulary then splits evenly over TP2 with no zero rows added, so the losses can be equal at TP1 and TP2.
VOCAB = GPT2_VOCAB + 1


def _save_with_tokenizer(model, path):
    from transformers import GPT2TokenizerFast

    model.save_pretrained(path)
    GPT2TokenizerFast(vocab=GPT2_VOCAB_FILE, merges=GPT2_MERGES).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=50256,
                        eos_token_id=50256)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # biases and norms non-trivial so that a mis-mapped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return _save_with_tokenizer(model, str(tmp_path_factory.mktemp("gpt2")))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("llama"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=5000.0,
                         bos_token_id=50256, eos_token_id=50256)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1 so that a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return _save_with_tokenizer(model, path)


def _round_trip(source, tmp_path, tp):
    from safetensors.torch import load_file

    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    code, out, err = import_hf(["--hf-model", source, "--output", ckpt, "--tensor-model-parallel-size", str(tp)])
    assert code == 0, err
    assert "--load" in out and "--finetune" in out
    assert ("--concept-layer 2" in out) == ("concept_dim" in open(os.path.join(source, "config.json")).read())
    code, out, err = convert(["--load", ckpt, "--output", back])
    assert code == 0, err
    original, exported = load_file(os.path.join(source, "model.safetensors")), load_file(
        os.path.join(back, "model.safetensors"))
    assert set(original) == set(exported)
    for name in original:
        assert torch.equal(original[name], exported[name]), name
    return ckpt


def _losses(ckpt, source):
    """(loss of the checkpoint's model in this stack, transformers' loss) on the same token ids."""
    from transformers import AutoModelForCausalLM

    from megatron_cocomix.conversion.checkpoint import load_checkpoint_tp1

    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model = load_checkpoint_tp1(ckpt).model
    with torch.no_grad():
        ours = model(inputs, torch.arange(32).expand(2, 32), None, labels=targets).float().mean().item()
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        theirs = hf(input_ids=inputs, labels=inputs).loss  # shifted inside: predicts tokens[:, 1:32]
        full = hf(input_ids=inputs).logits[:, -1].log_softmax(-1).gather(-1, targets[:, -1:]).mean()
    # transformers drops the last position's target (not in its input): add it back to compare the same 32 tokens.
    return ours, ((theirs * 31 * 2 - full * 2) / 64).item()


@pytest.mark.parametrize("tp", [1, 2])
def test_gpt2_round_trip_and_loss(tp, tiny_gpt2, tmp_path, single_process):
    ckpt = _round_trip(tiny_gpt2, tmp_path, tp)
    ours, theirs = _losses(ckpt, tiny_gpt2)
    assert abs(ours - theirs) <= 1e-4 * abs(theirs), (ours, theirs)


def test_llama_round_trip_and_loss(tiny_llama, tmp_path, single_process):
    ckpt = _round_trip(tiny_llama, tmp_path, 2)
    ours, theirs = _losses(ckpt, tiny_llama)
    assert abs(ours - theirs) <= 1e-4 * abs(theirs), (ours, theirs)


def test_import_bad_input(tmp_path, single_process):
    code, _, err = import_hf(["--hf-model", str(tmp_path / "nothing"), "--output", str(tmp_path / "out")])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --hf-model")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_gguf_imports(tmp_path, single_process, smollm2_directory):
    """The shipped SmolLM2-135M-Instruct .gguf (dequantised) imports; the checkpoint's logits in this stack equal
    transformers' on the same dequantised weights (read by transformers' gguf reader into a HF directory)."""
    from transformers import AutoModelForCausalLM

    from megatron_cocomix.conversion.checkpoint import load_checkpoint_tp1, megatron_logits
    from megatron_cocomix.conversion.export import compare_logits
    from tests.helpers.smollm2 import smollm2_gguf

    gguf = smollm2_gguf()
    code, out, err = import_hf(["--hf-model", gguf, "--output", str(tmp_path / "ckpt"), "--seq-length", "256"])
    assert code == 0, err
    assert "--num-layers 30 --hidden-size 576" in out and "--num-query-groups 3" in out
    tokens = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    ours = megatron_logits(load_checkpoint_tp1(str(tmp_path / "ckpt")).model, tokens)
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(smollm2_directory).eval()(input_ids=tokens).logits
    numbers = compare_logits(ours[..., :theirs.shape[-1]], theirs)
    print(f"\nSmolLM2-135M gguf import: {numbers}")
    assert numbers["max_abs_logit_diff"] <= 1e-3 and numbers["mean_kl"] <= 1e-4


def test_imported_gpt2_trains_at_tp2_with_transformers_loss(tiny_gpt2, tmp_path, single_process):
    """pretrain_cocomix.py --load IMPORT --finetune at TP2 (the printed flags): its first iteration's lm loss (before
    any update) equals transformers' loss on the same batch. Every document is the same 32 tokens, so every
    training sample is doc + doc[0] whatever the shuffle."""
    import shlex

    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import AutoModelForCausalLM

    from tests.helpers.launch import run_pretrain

    ckpt = str(tmp_path / "ckpt")
    code, out, err = import_hf(["--hf-model", tiny_gpt2, "--output", ckpt, "--tensor-model-parallel-size", "2",
                                "--seq-length", "32"])
    assert code == 0, err
    printed = shlex.split(out.split("pretrain_cocomix.py", 1)[1].split("<data", 1)[0])
    doc = torch.randint(0, GPT2_VOCAB, (32,), generator=torch.Generator().manual_seed(5), dtype=torch.int32)
    prefix = str(tmp_path / "same_doc")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    for _ in range(64):
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    summary = run_pretrain(printed + ["--data-path", prefix, "--micro-batch-size", "2", "--global-batch-size", "4",
                                      "--train-iters", "1", "--lr", "1e-4", "--hidden-dropout", "0",
                                      "--attention-dropout", "0", "--eval-interval", "1000", "--eval-iters", "1",
                                      "--split", "90,10,0",
                                      "--log-interval", "1", "--num-workers", "0"], tmp_path, nproc=2)
    ours = summary["train_history"][0]["lm loss"]
    sample = torch.cat([doc, doc[:1]]).long()[None]
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float32).eval()
        logits = hf(input_ids=sample[:, :-1]).logits
    theirs = torch.nn.functional.cross_entropy(logits[0], sample[0, 1:]).item()
    print(f"\nimported GPT-2 at TP2: lm loss {ours:.6f}, transformers {theirs:.6f}")
    assert abs(ours - theirs) <= 1e-4 * abs(theirs), (ours, theirs)


@pytest.mark.parametrize("variant", ["cocomix", "cocomix_rope", "pause"])
def test_cocomix_export_round_trip(variant, checkpoints, export_root, tmp_path, single_process):
    """A CoCoMix / pause-token export imports with its concept layer: export -> checkpoint -> export is
    bit-identical, and the printed flags name the concept layer."""
    from tests.helpers.hf_checkpoints import export

    source, _ = export(checkpoints("tp1")[variant], export_root, ("tp1", variant))
    ckpt = _round_trip(source, tmp_path, 2)
    assert os.path.isdir(ckpt)


def test_ntp_import_with_a_fresh_concept_layer_finetunes_as_cocomix(tiny_gpt2, tmp_path, single_process):
    """--concept-layer adds a concept layer drawn fresh (and says so); pretrain_cocomix.py --load --finetune
    --cocomix continues from it (online labels from a GPT-2-vocabulary teacher), and its export keeps the imported
    GPT-2 weights unchanged."""
    import shlex

    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from safetensors.torch import load_file

    from tests.helpers.cocomix_assets import tiny_sae
    from tests.helpers.launch import run_pretrain

    ckpt = str(tmp_path / "ckpt")
    code, out, err = import_hf(["--hf-model", tiny_gpt2, "--output", ckpt, "--seq-length", "32",
                                "--concept-layer", "1", "--concept-dim", "64", "--concept-topk", "4"])
    assert code == 0, err
    assert "the concept layer (block 1: predictor, compression, pre_bias) starts fresh" in out
    printed = shlex.split(out.split("pretrain_cocomix.py", 1)[1].split("<", 1)[0])
    assert printed[printed.index("--concept-layer") + 1] == "1" and "--cocomix" in printed

    code, _, err = convert(["--load", ckpt, "--output", str(tmp_path / "back")])
    assert code == 0, err
    source, back = load_file(os.path.join(tiny_gpt2, "model.safetensors")), load_file(
        str(tmp_path / "back" / "model.safetensors"))
    for name, tensor in source.items():
        assert torch.equal(back[name], tensor), name
    assert back["transformer.concept_predictor.weight"].std() > 0.01  # drawn, not zeros

    prefix = str(tmp_path / "docs")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    g = torch.Generator().manual_seed(0)
    for _ in range(64):
        builder.add_item(torch.randint(0, GPT2_VOCAB, (40,), generator=g, dtype=torch.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    teacher = ["--teacher-model", tiny_teacher(vocab_size=GPT2_VOCAB), "--teacher-layer", "1", "--sae", tiny_sae()]
    summary = run_pretrain(printed + teacher + ["--data-path", prefix, "--split", "90,10,0", "--micro-batch-size", "2",
                                                "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-4",
                                                "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "1",
                                                "--num-workers", "0"], tmp_path, nproc=1)
    assert summary["iteration"] == 2 and "concept loss" in summary["train_history"][0]


def test_official_release_layout_imports(checkpoints, export_root, tmp_path, single_process):
    """A directory as the official release saves GPT2CoCoMixLMHeadModel (model_type gpt2, its constructor arguments
    in config.json, no remote code): imports with its concept layer, and back to the same tensors."""
    import json
    import shutil

    from safetensors.torch import load_file

    from tests.helpers.hf_checkpoints import export

    source, _ = export(checkpoints("tp1")["cocomix"], export_root, ("tp1", "cocomix"))
    official = tmp_path / "official"
    shutil.copytree(source, official)
    for name in ("configuration_cocomix.py", "modeling_cocomix.py"):
        os.remove(official / name)
    with open(official / "config.json") as f:
        config = json.load(f)
    for key in ("auto_map", "position_embedding_type", "rotary_base", "mixing"):
        config.pop(key)
    config.update(model_type="gpt2", architectures=["GPT2CoCoMixLMHeadModel"])
    with open(official / "config.json", "w") as f:
        json.dump(config, f)
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    code, out, err = import_hf(["--hf-model", str(official), "--output", ckpt])
    assert code == 0, err
    assert "--cocomix --concept-layer 2 --concept-dim 64 --concept-topk 4" in out
    code, _, err = convert(["--load", ckpt, "--output", back])
    assert code == 0, err
    original, exported = load_file(str(official / "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert set(original) == set(exported) and all(torch.equal(original[k], exported[k]) for k in original)
