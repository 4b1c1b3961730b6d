"""Export a loaded checkpoint (conversion/checkpoint.py) to a Hugging Face directory, and check it.

    build_hf_model   megatron TP1 model -> transformers model (GPT2LMHeadModel, LlamaForCausalLM or CoCoMix class)
    write_export     config.json (+ auto_map and the two CoCoMix source files), model.safetensors (sharded with an
                     index above --max-shard-size), generation_config.json, tokenizer files; into a fresh
                     directory next to the target, renamed into place only when complete
    compare_logits   max |logit difference| and mean KL(checkpoint || export) on fixed prompts
    checkpoint_to_hf          a checkpoint as the transformers model it exports to, in memory
    hf_model_from_checkpoint  the same with its tokenizer
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from megatron_cocomix.conversion.weights import hf_config, megatron_to_hf
from megatron_cocomix.files import publishing_dir

HF_SOURCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf")
COCOMIX_FILES = ("configuration_cocomix.py", "modeling_cocomix.py")
AUTO_MAP = {"AutoConfig": "configuration_cocomix.CoCoMixConfig",
            "AutoModelForCausalLM": "modeling_cocomix.CoCoMixForCausalLM"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_hf_model(model: torch.nn.Module, args, architecture: str, tokenizer: dict,
                   dtype: torch.dtype = torch.float32):
    """The transformers model holding the checkpoint's weights (vocabulary cut to the tokenizer's), in `dtype`."""
    # An imported model may have more rows than its tokenizer has tokens: those are the model's, kept.
    vocab_size = max(tokenizer["vocab_size"], getattr(args, "hf_vocab_size", None) or 0)
    if vocab_size > args.padded_vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the checkpoint's vocabulary has only "
                         f"{args.padded_vocab_size} rows: pass the tokenizer flags of the run")
    config = hf_config(args, architecture, vocab_size, tokenizer["eod"], dtype)
    if architecture == "cocomix":
        from megatron_cocomix.hf import CoCoMixForCausalLM as cls

        config.auto_map = dict(AUTO_MAP)
    elif architecture == "llama":
        from transformers import LlamaForCausalLM as cls
    else:
        from transformers import GPT2LMHeadModel as cls
    hf = cls(config)
    state = megatron_to_hf(model, args, architecture, vocab_size)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"weight map incomplete: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    hf.tie_weights()
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = tokenizer["eod"]
    hf.generation_config.pad_token_id = tokenizer["eod"]
    return hf.to(dtype).eval()


def checkpoint_to_hf(root: str, iteration: Optional[int], check_args=None, dtype: torch.dtype = torch.float32):
    """(transformers model, LoadedCheckpoint) of the checkpoint under `root` (latest, or `iteration`), converted in
    memory as tools/convert_to_hf.py converts it. `check_args(args)` may refuse the run's flags before any weight
    is read (its architecture is always checked); a checkpoint that records no tokenizer is refused."""
    from megatron_cocomix.conversion.checkpoint import find_checkpoint, load_checkpoint_tp1, read_common
    from megatron_cocomix.conversion.weights import choose_architecture

    path = find_checkpoint(root, iteration)
    if (read_common(path).get("export") or {}).get("tokenizer") is None:
        raise ValueError(f"{path} records no tokenizer: export it with tools/convert_to_hf.py and its tokenizer "
                         f"flags, then use --hf-model")
    architectures = []

    def check(args) -> None:
        if check_args is not None:
            check_args(args)
        architectures.append(choose_architecture(args))

    loaded = load_checkpoint_tp1(root, iteration, check_args=check)
    return build_hf_model(loaded.model, loaded.args, architectures[0], loaded.tokenizer, dtype), loaded


def hf_model_from_checkpoint(root: str, iteration: Optional[int], directory: str, check_args=None):
    """(model, tokenizer) of the checkpoint under `root` (checkpoint_to_hf); the tokenizer files go to
    `directory`."""
    from transformers import AutoTokenizer

    from megatron_cocomix.conversion.tokenizer_files import write_tokenizer

    model, loaded = checkpoint_to_hf(root, iteration, check_args)
    write_tokenizer(loaded.tokenizer, directory, loaded.args.seq_length)
    return model, AutoTokenizer.from_pretrained(directory)


def check_output(output: str, overwrite: bool) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output}: exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ValueError(f"--output {output}: directory is not empty (add --overwrite to replace it)")


def write_export(hf, tokenizer: dict, output: str, max_shard_size: str, model_max_length: int,
                 check=None) -> None:
    """Write everything into a temporary sibling of `output`, run `check(tmp_dir)`, then rename into place."""
    from megatron_cocomix.conversion.tokenizer_files import write_tokenizer

    with publishing_dir(output) as tmp:
        hf.save_pretrained(tmp, max_shard_size=max_shard_size)
        if getattr(hf.config, "model_type", None) == "cocomix":
            for name in COCOMIX_FILES:
                shutil.copyfile(os.path.join(HF_SOURCE_DIR, name), os.path.join(tmp, name))
        write_tokenizer(tokenizer, tmp, model_max_length)
        if check is not None:
            check(tmp)


def load_export(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()


def fixed_prompts(vocab_size: int, seq_length: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, min(seq_length, 64)), generator=generator)


def compare_logits(reference: torch.Tensor, exported: torch.Tensor) -> Dict[str, float]:
    """reference, exported [b, s, V] (fp32): max |difference| and mean over tokens of KL(reference || exported)."""
    log_p, log_q = F.log_softmax(reference.float(), -1), F.log_softmax(exported.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"max_abs_logit_diff": (reference - exported).abs().max().item(), "mean_kl": kl.mean().item()}


def hf_logits(hf, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=attention_mask, use_cache=False).logits.float()
