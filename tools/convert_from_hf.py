"""Import a Hugging Face causal LM into a training checkpoint that pretrain_cocomix.py continues from.

    python tools/convert_from_hf.py --hf-model DIR_OR_GGUF --output CKPT_DIR \
        [--tensor-model-parallel-size N] [--pipeline-model-parallel-size M] [--seq-length S] [--overwrite]

GPT2LMHeadModel and Llama-family models (a directory, or a .gguf file, dequantised) are imported; the tokenizer is
saved under CKPT_DIR/tokenizer. The checkpoint loads at any layout; N fixes the vocabulary padding the run will
use, so pass the N you will train with. At the end it prints the flags to continue with:

    pretrain_cocomix.py <printed flags> --load CKPT_DIR --finetune <your training flags>

CoCoMix and pause-token models (this project's exports, or the official release's GPT2CoCoMixLMHeadModel, whose
config.json has concept_dim) import with their concept layer. --concept-layer L --concept-dim C adds a fresh
concept layer to an NTP model (drawn from --seed as training draws it; the log says so), for CoCoMix fine-tuning
of a pretrained model. Bad input: one `error:` line, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--hf-model", required=True, help="Hugging Face model directory or .gguf file.")
    parser.add_argument("--output", required=True, help="Checkpoint directory to write (the run's --load).")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="Tensor-parallel size the run will train with (fixes its vocabulary padding; printed "
                             "with the flags).")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                        help="Pipeline-parallel size the run will train with (printed with the flags).")
    parser.add_argument("--seq-length", type=int, default=2048,
                        help="Training sequence length to print (capped at the model's position table).")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                        help="Vocabulary padding of the run (printed with the flags). Default: the smallest that "
                             "covers the model's rows, so that no row is added unless the tensor-parallel size "
                             "needs it (added rows are zero, so their logits are 0 and enter the softmax: the loss "
                             "then differs from transformers').")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output.")
    fresh = parser.add_argument_group("a fresh concept layer on an NTP model (CoCoMix fine-tuning of an import)")
    fresh.add_argument("--concept-layer", type=int, default=None,
                       help="Add a CoCoMix concept layer at this block, its weights drawn fresh from --seed.")
    fresh.add_argument("--concept-dim", type=int, default=None, help="Number of concepts C (the SAE's latents).")
    fresh.add_argument("--concept-topk", type=int, default=32,
                       help="Concept logits kept per token (training's --concept-topk).")
    fresh.add_argument("--seed", type=int, default=1234, help="Seed of the fresh concept layer (training's init).")
    return parser


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    from megatron_cocomix.conversion.export import check_output

    check_output(options.output, options.overwrite)
    if not os.path.exists(options.hf_model):
        raise FileNotFoundError(f"--hf-model {options.hf_model}: no such file or directory")

    from megatron_cocomix.arguments import parse_args
    from megatron_cocomix.conversion.checkpoint import _SINGLE_PROCESS, _init_single_process, build_model
    from megatron_cocomix.conversion.from_hf import (
        concept_flags,
        flags_for,
        hf_to_megatron,
        load_hf,
        save_checkpoint_tp1,
    )
    from megatron_cocomix.data.tokenizer import HuggingFaceTokenizer, vocab_size_with_padding
    from megatron_cocomix.global_vars import set_tokenizer

    hf, hf_tokenizer = load_hf(options.hf_model)
    arch, network = flags_for(hf.config, options.seq_length)
    tmp = f"{os.path.abspath(options.output).rstrip(os.sep)}.tmp-import"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer_dir = os.path.join(tmp, "tokenizer")
        hf_tokenizer.save_pretrained(tokenizer_dir)
        tokenizer = HuggingFaceTokenizer(tokenizer_dir)
        final_tokenizer = os.path.join(os.path.abspath(options.output), "tokenizer")
        tp, pp = options.tensor_model_parallel_size, options.pipeline_model_parallel_size
        divisible_by = options.make_vocab_size_divisible_by or next(
            d for d in range(1, 4097) if vocab_size_with_padding(tokenizer.vocab_size, d, tp) >= hf.config.vocab_size)
        layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                  "--make-vocab-size-divisible-by", str(divisible_by)]
        tokenizer_flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", final_tokenizer]
        placeholders = ["--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-4", "--mock-data"]
        here = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir]
        concept = concept_flags(hf.config) if arch == "cocomix" else []
        fresh = options.concept_layer is not None
        if fresh:
            if arch != "gpt2" and arch != "llama":
                raise ValueError("--concept-layer: the model already has one (a CoCoMix / pause-token model)")
            if options.concept_dim is None or options.concept_dim <= 0:
                raise ValueError("--concept-layer needs a positive --concept-dim (the SAE's number of latents)")
            concept = ["--cocomix", "--concept-layer", str(options.concept_layer), "--concept-dim",
                       str(options.concept_dim), "--concept-topk", str(options.concept_topk)]
        pause = concept if concept[:1] == ["--pause-tokens"] else []
        args = parse_args(network + pause + layout + here + placeholders, world_size=tp * pp)
        if concept and not pause:  # the model alone: the concept labels' flags are the run's business
            if not 0 < int(concept[2]) < args.num_layers:
                raise ValueError(f"--concept-layer {concept[2]} must be in [1, {args.num_layers})")
            args.cocomix, args.concept_layer = True, int(concept[2])
            args.concept_dim, args.concept_topk = int(concept[4]), int(concept[6])
        args.padded_vocab_size = vocab_size_with_padding(tokenizer.vocab_size, divisible_by, tp)
        if hf.config.vocab_size > args.padded_vocab_size:
            raise ValueError(f"{options.hf_model}: vocab_size {hf.config.vocab_size} exceeds the tokenizer's "
                             f"{tokenizer.vocab_size} tokens padded to {args.padded_vocab_size}: raise "
                             f"--make-vocab-size-divisible-by so that the padding covers the model's rows")
        # The export keeps the model's own rows (some models have more rows than their tokenizer has tokens).
        args.hf_vocab_size = int(hf.config.vocab_size)
        for name, value in _SINGLE_PROCESS.items():
            setattr(args, name, value)
        _init_single_process(args)
        set_tokenizer(tokenizer)
        model = build_model(args)
        state = hf_to_megatron(hf.state_dict(), args, arch)
        if fresh:
            from megatron.core.utils import get_model_config

            from megatron_cocomix.model.gpt import initialize_weights

            # Training's layout-independent draw; the imported tensors then overwrite all but the concept layer.
            initialize_weights([model], options.seed, get_model_config(model),
                               tied_embeddings=not args.untie_embeddings_and_output_weights)
            result = model.load_state_dict(state, strict=False)
            own = f"decoder.layers.{args.concept_layer}.concept_mixing."
            if result.unexpected_keys or any(not k.startswith(own) for k in result.missing_keys):
                raise RuntimeError(f"weight map incomplete: {result}")
        else:
            model.load_state_dict(state, strict=True)
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp  # recorded for the run
        args.tokenizer_model = final_tokenizer
        save_checkpoint_tp1(model, args, tmp)
        if os.path.isdir(options.output):
            shutil.rmtree(options.output)
        os.rename(tmp, options.output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if args.padded_vocab_size > hf.config.vocab_size:
        print(f"note: {args.padded_vocab_size - hf.config.vocab_size} zero vocabulary rows added (padding for "
              f"--tensor-model-parallel-size {tp}); training masks them out of every softmax")
    print(f"imported {options.hf_model} ({type(hf).__name__}, {sum(p.numel() for p in hf.parameters()):,} "
          f"parameters, vocabulary {hf.config.vocab_size} padded to {args.padded_vocab_size}) into {options.output}")
    if fresh:
        print(f"the concept layer (block {options.concept_layer}: predictor, compression, pre_bias) starts fresh: "
              f"drawn from --seed {options.seed} as training initialises it; every other weight is imported")
    labels = " <--teacher-model/--teacher-layer/--sae or --concept-labels>" if concept and not pause else ""
    print("continue training with:\n  pretrain_cocomix.py " + shlex.join(network + concept + layout + tokenizer_flags)
          + f" --load {shlex.quote(options.output)} --finetune{labels} <data and training flags>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
