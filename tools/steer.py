"""CoCoMix concept steering, side by side: the greedy continuations of one prompt with one concept's logit scaled
by each of several factors before the concept layer's top-k, at every position of the prompt and of the generation
(the paper's steering figure; 1 is the unsteered model). A negative scale flips the logit's sign: the concept
leaves the top-k wherever the model predicted it (a positive logit) and enters it, with a large weight, wherever
its logit was negative; `--mode add` with a negative scale pushes it out everywhere.

    python tools/steer.py --hf-model HF_DIR --prompt "The weather today" --concept 1234 --scales -10,-5,0,1,5,10
    python tools/steer.py --load CKPT_DIR --prompt "..." --concept top \
        --latent-descriptions latents.jsonl --output steering.json

`--concept top` steers the concept the model predicts most strongly at the prompt's last token. With
--latent-descriptions (tools/describe_latents.py's JSON lines, or any file tools/inspect_concepts.py reads) the
concept's description is printed beside its id; --output saves the table as JSON.
"""

from __future__ import annotations

import argparse
import json
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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-model", metavar="HF_DIR", help="A CoCoMix export (tools/convert_to_hf.py).")
    source.add_argument("--load", metavar="CKPT_DIR", help="A CoCoMix training checkpoint directory.")
    parser.add_argument("--iteration", type=int, default=None, help="With --load: iteration (default latest).")
    parser.add_argument("--prompt", required=True, help="Text to continue.")
    parser.add_argument("--concept", required=True, metavar="ID|top",
                        help="The concept (SAE latent) id to steer, or `top`: the model's top predicted concept at "
                             "the prompt's last token.")
    parser.add_argument("--scales", default="-10,-5,0,1,5,10", help="Comma-separated scales (1 = unsteered).")
    parser.add_argument("--mode", choices=["multiply", "add"], default="multiply",
                        help="Multiply the concept's logit (the paper; a negative scale also flips a negative logit "
                             "into the top-k) or add the scale to it (a negative one pushes the concept out).")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Tokens generated after the prompt per scale.")
    parser.add_argument("--latent-descriptions", metavar="FILE",
                        help="Words for the concept ids (the formats of tools/inspect_concepts.py's flag, e.g. "
                             "tools/describe_latents.py's JSON lines).")
    parser.add_argument("--output", metavar="FILE.json", help="Also save the prompt, concept, description, scales "
                                                              "and continuations as JSON.")
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


def top_concept(model, tokenizer, prompt: str) -> int:
    """The concept with the largest concept logit at the prompt's last token."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("--prompt: the prompt has no tokens")
    with torch.no_grad():
        return int(model.concept_logits(ids)[0, -1].argmax())


def _options(argv) -> argparse.Namespace:
    options = build_parser().parse_args(argv)
    try:
        options.scales = [float(s) for s in options.scales.split(",")]
    except ValueError:
        raise ValueError(f"--scales {options.scales}: expected comma-separated numbers") from None
    if options.concept != "top" and not options.concept.lstrip("-").isdigit():
        raise ValueError(f"--concept {options.concept}: expected a concept id or `top`")
    if options.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {options.max_new_tokens}")
    if options.output:
        parent = os.path.dirname(os.path.abspath(options.output))
        if os.path.isdir(options.output) or not os.path.isdir(parent):
            raise ValueError(f"--output {options.output}: not a file in an existing directory")
    return options


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    options = _options(argv)
    from megatron_cocomix.concepts.inspection import load_latent_descriptions
    from tools.inspect_concepts import load_concept_model

    descriptions = None
    if options.latent_descriptions:  # read before the model, so a bad file fails at once
        descriptions = load_latent_descriptions(options.latent_descriptions)
    model, tokenizer = load_concept_model(options.hf_model, options.load, options.iteration)
    model = model.float().eval()
    if descriptions is not None:
        descriptions = load_latent_descriptions(options.latent_descriptions, model.config.concept_dim)
    concept = top_concept(model, tokenizer, options.prompt) if options.concept == "top" else int(options.concept)
    texts = continuations(model, tokenizer, options.prompt, concept, options.scales, options.mode,
                          options.max_new_tokens)
    description = (descriptions or {}).get(concept)
    name = str(concept) if description is None else f"{concept}: {' '.join(description.split())}"
    chosen = " (the top predicted concept at the prompt's last token)" if options.concept == "top" else ""
    how = "multiply its logit" if options.mode == "multiply" else "are added to its logit"
    width = max(len(f"{s:g}") for s in options.scales)
    print(f"prompt: {options.prompt!r}")
    print(f"concept {name}{chosen}; the scales {how}")
    for scale, text in zip(options.scales, texts):
        print(f"  {scale:>{width}g} | {text!r}")
    if options.output:
        result = {"model": options.hf_model or options.load, "prompt": options.prompt, "concept": concept,
                  "chosen": options.concept, "description": description, "mode": options.mode,
                  "max_new_tokens": options.max_new_tokens,
                  "continuations": [{"scale": s, "text": t} for s, t in zip(options.scales, texts)]}
        with open(options.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
