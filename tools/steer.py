"""CoCoMix concept steering, side by side: the greedy continuations of one prompt with one concept's logit scaled
by each of several factors before the concept layer's top-k (the paper's steering figure; 1 is the unsteered
model, negative scales push the concept out).

    python tools/steer.py --hf-model HF_DIR --prompt "The weather today" --concept 1234 --scales -10,-5,0,1,5,10
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.errors import cli_main  # noqa: E402
from tools.generate import parse_steering  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Greedy continuations of a prompt under several steering scales "
                                                 "of one CoCoMix concept.", allow_abbrev=False)
    parser.add_argument("--hf-model", required=True, help="A CoCoMix export (tools/convert_to_hf.py).")
    parser.add_argument("--prompt", required=True, help="Text to continue.")
    parser.add_argument("--concept", type=int, required=True, help="The concept (SAE latent) id to steer.")
    parser.add_argument("--scales", default="-10,-5,0,1,5,10", help="Comma-separated scales (1 = unsteered).")
    parser.add_argument("--mode", choices=["multiply", "add"], default="multiply",
                        help="Multiply the concept's logit (the paper) or add the scale to it.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Tokens generated after the prompt per scale.")
    return parser


def continuations(model, tokenizer, prompt: str, concept: int, scales: List[float], mode: str,
                  max_new_tokens: int) -> List[str]:
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = []
    for scale in scales:
        steering = parse_steering(f"{concept}:{scale}", mode, model)
        with torch.no_grad():
            tokens = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                    pad_token_id=tokenizer.eos_token_id, **steering)
        out.append(tokenizer.decode(tokens[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        scales = [float(s) for s in options.scales.split(",")]
    except ValueError:
        raise ValueError(f"--scales {options.scales}: expected comma-separated numbers") from None
    if not os.path.isfile(os.path.join(options.hf_model, "config.json")):
        raise FileNotFoundError(f"--hf-model {options.hf_model}: no config.json there")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(options.hf_model, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(options.hf_model, trust_remote_code=True)
    texts = continuations(model, tokenizer, options.prompt, options.concept, scales, options.mode,
                          options.max_new_tokens)
    width = max(len(f"{s:g}") for s in scales)
    print(f"prompt: {options.prompt!r}; concept {options.concept} ({options.mode})")
    for scale, text in zip(scales, texts):
        print(f"  {scale:>{width}g} | {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
