"""tools/convert_to_hf.py on checkpoints saved at TP1, TP2 x PP2, PP2 x virtual PP2, and DP2 with DeepSpeed ZeRO-3,
ZeRO-2, ZeRO-1 and megatron's distributed optimizer.

Each export is verified by the tool (the checkpoint's own model at TP1 in this process against the written
directory loaded back through AutoModelForCausalLM: max |logit diff| and mean KL <= 1e-4, fp32). Independently of
the tool's loader, an export from a parallel layout must match the TP1 export of the same variant (same seed,
same data, 2 steps: the weights agree to rounding), which a mis-resharded tensor would break.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers.hf_checkpoints import LAYOUTS, export, logits_of

CASES = [(layout, variant) for layout, (_, _, variants) in LAYOUTS.items() for variant in variants]
ARCHITECTURE = {"cocomix": "CoCoMixForCausalLM", "cocomix_rope": "CoCoMixForCausalLM",
                "pause": "CoCoMixForCausalLM", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                "cocomix_zero1": "CoCoMixForCausalLM", "cocomix_bf16": "CoCoMixForCausalLM",
                "gpt2_distopt": "GPT2LMHeadModel", "gpt2_zero2": "GPT2LMHeadModel"}
SAME_MODEL = {"cocomix_zero1": "cocomix", "gpt2_distopt": "gpt2", "gpt2_zero2": "gpt2"}  # other back ends, same model and data


@pytest.mark.parametrize("layout,variant", CASES, ids=[f"{lay}-{var}" for lay, var in CASES])
def test_export_verifies_and_matches_tp1(layout, variant, checkpoints, export_root, single_process):
    path, numbers = export(checkpoints(layout)[variant], export_root, (layout, variant))
    print(f"\n{layout} {variant}: max abs logit diff {numbers['max_abs_logit_diff']:.2e}, "
          f"mean KL {numbers['mean_kl']:.2e}")
    assert numbers["max_abs_logit_diff"] <= 1e-4 and numbers["mean_kl"] <= 1e-4
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == [ARCHITECTURE[variant]] and config["vocab_size"] == 256
    assert config["dtype"] == ("bfloat16" if variant.endswith("bf16") else "float32")
    assert os.path.isfile(os.path.join(path, "generation_config.json"))
    assert os.path.isfile(os.path.join(path, "tokenizer.json"))
    if layout != "tp1":
        base = SAME_MODEL.get(variant, variant)
        reference, _ = export(checkpoints("tp1")[base], export_root, ("tp1", base))
        tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(logits_of(path, tokens), logits_of(reference, tokens), rtol=0, atol=2e-3)


def test_export_tokenizer_reads_the_training_ids(checkpoints, export_root, single_process):
    """NullTokenizer runs (the tiny checkpoints): ids are the text's integers, eos is the eod id."""
    from transformers import AutoTokenizer

    path, _ = export(checkpoints("tp1")["gpt2"], export_root, ("tp1", "gpt2"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("3 1 4 254", add_special_tokens=False)["input_ids"] == [3, 1, 4, 254]
    assert tokenizer.eos_token_id == 255


def test_sharded_bf16_export(checkpoints, tmp_path, single_process):
    """--dtype bf16 with small shards: an index file, bf16 tensors, and verify (the checkpoint's model rounded to
    bf16 the same way) within 1e-4."""
    from safetensors import safe_open

    from tests.helpers.hf_checkpoints import VERIFY_RE, convert

    output = str(tmp_path / "bf16")
    code, out, err = convert(["--load", checkpoints("tp1")["cocomix"], "--output", output, "--dtype", "bf16",
                              "--max-shard-size", "100KB"])
    assert code == 0, err
    numbers = VERIFY_RE.search(out)
    assert numbers and float(numbers.group(1)) <= 1e-4, out
    with open(os.path.join(output, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 1
    with safe_open(os.path.join(output, shards[0]), "pt") as f:
        assert all(f.get_tensor(name).dtype == torch.bfloat16 for name in f.keys())


def test_hf_package_imports_no_megatron():
    import subprocess
    import sys

    from tests.helpers.launch import test_env

    code = ("import sys, megatron_cocomix.hf; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'megatron'], 'megatron imported'")
    proc = subprocess.run([sys.executable, "-c", code], env=test_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
