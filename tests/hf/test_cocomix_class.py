"""The exported CoCoMix class: the official release's parameter names / shapes / config keys, loading in a fresh
offline interpreter without this project, and generation with the KV cache equal to generation without it.

OFFICIAL is written from reading facebookresearch/RAM projects/cocomix/models/modeling_gpt2_cocomix.py
(GPT2CoCoMixLMHeadModel(config, concept_dim, insert_layer_idx, concept_num)): GPT-2's transformer (Conv1D
weights [in, out]) plus transformer.pre_bias [d], transformer.concept_predictor = nn.Linear(d, C),
transformer.compress_layer = nn.Linear(C, d), and lm_head = nn.Linear(d, V, bias=False) (tied to wte).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers.hf_checkpoints import export

D, LAYERS, VOCAB, POSITIONS, CONCEPTS, INNER = 64, 4, 256, 64, 64, 256


def official_table():
    table = {"transformer.wte.weight": (VOCAB, D), "transformer.wpe.weight": (POSITIONS, D),
             "transformer.ln_f.weight": (D,), "transformer.ln_f.bias": (D,), "transformer.pre_bias": (D,),
             "transformer.concept_predictor.weight": (CONCEPTS, D), "transformer.concept_predictor.bias": (CONCEPTS,),
             "transformer.compress_layer.weight": (D, CONCEPTS), "transformer.compress_layer.bias": (D,),
             "lm_head.weight": (VOCAB, D)}
    for i in range(LAYERS):
        h = f"transformer.h.{i}."
        table.update({h + "ln_1.weight": (D,), h + "ln_1.bias": (D,), h + "ln_2.weight": (D,), h + "ln_2.bias": (D,),
                      h + "attn.c_attn.weight": (D, 3 * D), h + "attn.c_attn.bias": (3 * D,),
                      h + "attn.c_proj.weight": (D, D), h + "attn.c_proj.bias": (D,),
                      h + "mlp.c_fc.weight": (D, INNER), h + "mlp.c_fc.bias": (INNER,),
                      h + "mlp.c_proj.weight": (INNER, D), h + "mlp.c_proj.bias": (D,)})
    return table


@pytest.fixture(scope="module")
def cocomix_export(checkpoints, export_root, single_process):
    return export(checkpoints("tp1")["cocomix"], export_root, ("tp1", "cocomix"))[0]


def test_export_has_the_official_names_shapes_and_config(cocomix_export):
    from safetensors import safe_open
    from transformers import GPT2Config

    with safe_open(os.path.join(cocomix_export, "model.safetensors"), "pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    table = official_table()
    assert set(saved) in (set(table), set(table) - {"lm_head.weight"})  # a tied lm_head may be omitted
    assert all(saved[name] == table[name] for name in saved), {n: s for n, s in saved.items() if s != table[n]}
    with open(os.path.join(cocomix_export, "config.json")) as f:
        config = json.load(f)
    assert (config["concept_dim"], config["insert_layer_idx"], config["concept_num"]) == (CONCEPTS, 2, 4)
    assert config["activation_function"] == "gelu_new" and config["n_positions"] == POSITIONS
    gpt2 = GPT2Config(**{k: v for k, v in config.items() if k not in ("model_type", "auto_map", "architectures")})
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.n_inner) == (D, LAYERS, 4, INNER)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cocomix.CoCoMixForCausalLM"
    for name in ("configuration_cocomix.py", "modeling_cocomix.py"):
        assert os.path.isfile(os.path.join(cocomix_export, name))


FRESH = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # config.json names remote code
ids = torch.tensor([tokenizer("5 17 200 3 9 31 77 128", add_special_tokens=False)["input_ids"]])
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save({"ids": ids, "logits": logits}, out)
batch = tokenizer(["5 17", "1 2 3 4"], return_tensors="pt", padding=True, padding_side="left")
assert batch["input_ids"].tolist() == [[255, 255, 5, 17], [1, 2, 3, 4]], batch["input_ids"]
model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("megatron", "megatron_cocomix"))
print(json.dumps({"leaked": leaked, "class": type(model).__name__}))
"""


def test_fresh_offline_process_loads_without_this_project(cocomix_export, tmp_path):
    from tests.helpers.hf_checkpoints import logits_of

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    script, out = tmp_path / "fresh.py", tmp_path / "out.pt"
    script.write_text(FRESH)
    proc = subprocess.run([sys.executable, str(script), cocomix_export, str(out)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert report == {"leaked": [], "class": "CoCoMixForCausalLM"}
    result = torch.load(out)
    assert result["ids"].tolist() == [[5, 17, 200, 3, 9, 31, 77, 128]]
    torch.testing.assert_close(result["logits"], logits_of(cocomix_export, result["ids"]), rtol=0, atol=1e-5)


def _generate(model, inputs, use_cache, **kwargs):
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, use_cache=use_cache,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=255, **kwargs)
    return out, 64 / (time.perf_counter() - start)


@pytest.mark.parametrize("variant", ["cocomix", "cocomix_rope", "pause"])
def test_cached_generation_equals_uncached(variant, checkpoints, export_root, single_process):
    from transformers import AutoModelForCausalLM

    path, _ = export(checkpoints("tp1")[variant], export_root, ("tp1", variant))
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    short, long = torch.randint(0, 255, (5,), generator=g), torch.randint(0, 255, (11,), generator=g)
    ids = torch.full((2, 11), 255)
    ids[0, 6:], ids[1] = short, long  # left padding
    mask = (torch.arange(11) >= torch.tensor([[6], [0]])).long()
    inputs = {"input_ids": ids, "attention_mask": mask}
    _generate(model, inputs, True, do_sample=False)  # warm-up: first-call costs out of the rates
    cached, cached_rate = _generate(model, inputs, True, do_sample=False)
    plain, plain_rate = _generate(model, inputs, False, do_sample=False)
    print(f"\n{variant}: greedy, 2 x 32 new tokens: cached {cached_rate:.0f} tokens/s, uncached {plain_rate:.0f}")
    assert cached.sequences.shape == (2, 43)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(plain.logits), rtol=0, atol=1e-4)
    # The padded prompt's continuation is the one it gets alone (padding is invisible).
    alone, _ = _generate(model, {"input_ids": short[None], "attention_mask": torch.ones(1, 5, dtype=torch.long)},
                         True, do_sample=False)
    assert torch.equal(alone.sequences[0, 5:], cached.sequences[0, 11:])
    torch.manual_seed(7)
    sampled, _ = _generate(model, inputs, True, do_sample=True, top_p=0.9, temperature=0.8)
    torch.manual_seed(7)
    sampled_plain, _ = _generate(model, inputs, False, do_sample=True, top_p=0.9, temperature=0.8)
    assert torch.equal(sampled.sequences, sampled_plain.sequences)


def test_cache_reused_across_calls(checkpoints, export_root, single_process):
    """A prompt fed in two calls through past_key_values gives the logits of one call."""
    from transformers import AutoModelForCausalLM

    path, _ = export(checkpoints("tp1")["cocomix_rope"], export_root, ("tp1", "cocomix_rope"))
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, 255, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        first = model(input_ids=ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        # Layers below the concept layer (2) hold one entry per token, the others two.
        assert [first.past_key_values.layers[i].keys.shape[2] for i in range(4)] == [7, 7, 14, 14]
        second = model(input_ids=ids[:, 7:], attention_mask=mask, past_key_values=first.past_key_values,
                       use_cache=True)
    assert second.past_key_values.get_seq_length(0) == 12 and second.past_key_values.get_seq_length(3) == 24
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1)[:, 4:], full[:, 4:], rtol=0, atol=1e-5)
    torch.testing.assert_close(second.logits[0], full[0, 7:], rtol=0, atol=1e-5)


def test_generate_continues_from_a_returned_cache(checkpoints, export_root, single_process):
    """generate() twice, the second call reusing the first's past_key_values, gives the one-call continuation."""
    from transformers import AutoModelForCausalLM

    path, _ = export(checkpoints("tp1")["cocomix"], export_root, ("tp1", "cocomix"))
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, 255, (2, 6), generator=torch.Generator().manual_seed(2))
    kwargs = dict(do_sample=False, pad_token_id=255, return_dict_in_generate=True)
    with torch.no_grad():
        whole = model.generate(ids, max_new_tokens=16, min_new_tokens=16, **kwargs)
        first = model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs)
        second = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=8,
                                min_new_tokens=8, **kwargs)
    assert torch.equal(second.sequences, whole.sequences)
