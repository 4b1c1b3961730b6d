"""Generate text from an export (--hf-model) or straight from a training checkpoint (--load), streaming.

    python tools/generate.py --hf-model HF_DIR --prompt "Once upon a time" [--max-new-tokens 64]
        [--temperature 1.0 --top-p 1.0 --seed 0 | --greedy]
    python tools/generate.py --load CKPT_DIR [--iteration N] --prompt ...

Uses transformers' generate() with the KV cache (the CoCoMix class caches one entry per token below the concept
layer, two from it on). A checkpoint is converted in memory, as tools/convert_to_hf.py would write it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-model", help="Hugging Face directory (an export of tools/convert_to_hf.py, or any).")
    source.add_argument("--load", help="Training checkpoint directory.")
    parser.add_argument("--iteration", type=int, default=None, help="With --load: iteration (default latest).")
    parser.add_argument("--prompt", required=True, help="Text to continue.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Tokens generated after the prompt.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (not with --greedy).")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (1: off; not with --greedy).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling.")
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding instead of sampling.")
    parser.add_argument("--steer", default=None, metavar="ID:SCALE[,ID:SCALE]",
                        help="CoCoMix concept steering: multiply these concept logits by SCALE (the paper uses -10 to "
                             "10) before the top-k at the concept layer, at every position.")
    parser.add_argument("--steer-mode", choices=["multiply", "add"], default="multiply",
                        help="Steering multiplies the chosen logits (the paper) or adds SCALE to them.")
    return parser


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    if options.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {options.max_new_tokens}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    with tempfile.TemporaryDirectory() as directory:
        if options.hf_model:
            if not os.path.isfile(os.path.join(options.hf_model, "config.json")):
                raise FileNotFoundError(f"--hf-model {options.hf_model}: no config.json there")
            model = AutoModelForCausalLM.from_pretrained(options.hf_model, trust_remote_code=True)
            tokenizer = AutoTokenizer.from_pretrained(options.hf_model, trust_remote_code=True)
        else:
            from megatron_cocomix.conversion.export import hf_model_from_checkpoint

            model, tokenizer = hf_model_from_checkpoint(options.load, options.iteration, directory)
    model.eval()
    steering = parse_steering(options.steer, options.steer_mode, model)
    ids = tokenizer(options.prompt, add_special_tokens=False, return_tensors="pt")
    if ids["input_ids"].shape[1] == 0:
        raise ValueError("--prompt: the prompt has no tokens")
    torch.manual_seed(options.seed)
    sampling = {} if options.greedy else {"temperature": options.temperature, "top_p": options.top_p}
    print(options.prompt, end="", flush=True)
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=options.max_new_tokens, do_sample=not options.greedy,
                       streamer=TextStreamer(tokenizer, skip_prompt=True), use_cache=True,
                       pad_token_id=tokenizer.eos_token_id, **steering, **sampling)
    return 0


def parse_steering(spec: Optional[str], mode: str, model) -> dict:
    """--steer "12:10,40:-5" -> {"concept_steering": {12: 10.0, 40: -5.0}} for generate(); {} without --steer."""
    if not spec:
        return {}
    if getattr(model.config, "model_type", None) != "cocomix" or getattr(model.config, "mixing", "") == "pause":
        raise ValueError("--steer needs a CoCoMix model (concepts to steer)")
    steering = {}
    for item in spec.split(","):
        try:
            concept, scale = item.split(":")
            steering[int(concept)] = float(scale)
        except ValueError:
            raise ValueError(f"--steer {spec}: expected ID:SCALE[,ID:SCALE], got {item!r}") from None
        if not 0 <= int(concept) < model.config.concept_dim:
            raise ValueError(f"--steer {spec}: concept {concept} is outside 0..{model.config.concept_dim - 1}")
    if mode == "add":
        steering["mode"] = "add"
    return {"concept_steering": steering}


if __name__ == "__main__":
    sys.exit(main())
