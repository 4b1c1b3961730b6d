"""Convert an OpenAI sparse-autoencoder `.pt` state dict (e.g. the GPT-2 "v5" TopK SAEs) to a SAELens folder.

    python tools/import_openai_sae.py --input v5_32k_layer_6.pt --output saes/gpt2_v5_32k_layer6 [--layer 6]

The file is read with torch.load(weights_only=True) (tensors only, no code); the output holds cfg.json +
sae_weights.safetensors with normalize_activations "layer_norm", so `load_sae(output)` gives the same encode
and decode as `load_sae(input)`; the tool checks that on random inputs before it returns. `load_sae` also
reads the .pt directly: converting only avoids keeping a torch pickle around.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert an OpenAI TopK SAE .pt file to a SAELens folder.",
                                allow_abbrev=False)
    p.add_argument("--input", required=True, help="OpenAI state dict (.pt).")
    p.add_argument("--output", required=True, help="SAELens folder to create.")
    p.add_argument("--layer", type=int, default=None, help="Record hook_name hidden_states.LAYER in cfg.json.")
    p.add_argument("--no-layer-norm", action="store_true", help="The SAE was trained without input LN.")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from megatron_cocomix.concepts import load_sae, save_saelens

    if os.path.exists(os.path.join(args.output, "sae_weights.safetensors")):
        raise ValueError(f"--output {args.output}: already holds an SAE; choose a new folder")
    sae = load_sae(args.input, normalize_input=not args.no_layer_norm)
    extra = {"source": os.path.abspath(args.input)}
    if args.layer is not None:
        extra["hook_name"] = f"hidden_states.{args.layer}"
    save_saelens(sae, args.output, extra_config=extra)
    again = load_sae(args.output)
    x = torch.randn(64, sae.d_model, generator=torch.Generator().manual_seed(0)) * 3
    if not torch.equal(sae(x), again(x)):
        raise ValueError(f"--output {args.output}: the converted SAE does not reproduce {args.input}")
    print(f"wrote {args.output}: d_model {sae.d_model}, {sae.num_latents} latents, k {sae.k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
