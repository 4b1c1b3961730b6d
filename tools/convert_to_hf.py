"""Export a training checkpoint to a Hugging Face directory that `transformers` loads offline.

    python tools/convert_to_hf.py --load CKPT_DIR [--iteration N] --output HF_DIR [--dtype fp32|bf16|fp16]
        [--overwrite] [--verify | --no-verify] [--max-shard-size 2GB] [tokenizer flags] [-- training flags]

Reads a checkpoint saved at any layout (TP / PP / virtual PP, megatron distributed optimizer, DeepSpeed ZeRO) in
one process on CPU. NTP models become GPT2LMHeadModel (learned positions, LayerNorm, GELU) or LlamaForCausalLM
(rotary, RMSNorm, SwiGLU); CoCoMix and pause-token models the CoCoMix class (config.json with auto_map and the
two source files, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` needs nothing of this
project). Other combinations are refused in one line naming the flag. The tokenizer comes from the checkpoint,
or from the tokenizer flags (checkpoints saved before it was recorded); the training flags after `--` serve
checkpoints saved before the flags were recorded.

--verify (default when the model fits in memory twice) runs the checkpoint's own model and the written export on
fixed prompts and prints the largest logit difference and the mean KL; beyond 1e-4 nothing is written and the
exit status is 1. Bad input: one `error:` line, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.errors import cli_main  # noqa: E402

TOLERANCE = 1e-4


def build_parser() -> argparse.ArgumentParser:
    from megatron_cocomix.data.tokenizer import add_tokenizer_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--load", required=True, help="Checkpoint directory (the training run's --save).")
    parser.add_argument("--iteration", type=int, default=None, help="Iteration to export (default: the latest).")
    parser.add_argument("--output", required=True, help="Hugging Face directory to write.")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="Weights' dtype (default: the dtype the model was trained in).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output.")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="Compare the export's logits with the checkpoint's (default: on when it fits in memory).")
    parser.add_argument("--max-shard-size", default="2GB", help="Largest safetensors shard (then an index is written).")
    add_tokenizer_args(parser.add_argument_group("tokenizer (for checkpoints that do not record it)"))
    return parser


def _fits_in_memory(model) -> bool:
    size = sum(p.numel() * 4 for p in model.parameters())
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return True
    return 3 * size < available


def _tokenizer_state(options, saved: Optional[dict], path: str) -> dict:
    from megatron_cocomix.conversion.tokenizer_files import tokenizer_state_from_flags

    state = tokenizer_state_from_flags(options.tokenizer_type, options.vocab_file, options.merge_file,
                                       options.tokenizer_model, options.vocab_size)
    if state is None:
        state = saved
    if state is None:
        raise ValueError(f"{path} records no tokenizer: pass --tokenizer-type and its files")
    return state


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_argv = None
    if "--" in argv:
        cut = argv.index("--")
        argv, train_argv = argv[:cut], argv[cut + 1:]
    options = build_parser().parse_args(argv)

    from megatron_cocomix.conversion.checkpoint import (
        find_checkpoint,
        load_checkpoint_tp1,
        megatron_logits,
        read_common,
    )
    from megatron_cocomix.conversion.export import (
        DTYPES,
        build_hf_model,
        check_output,
        compare_logits,
        fixed_prompts,
        hf_logits,
        load_export,
        write_export,
    )
    from megatron_cocomix.conversion.weights import choose_architecture
    from megatron_cocomix.model.gpt import dtype_from_args

    check_output(options.output, options.overwrite)
    path = find_checkpoint(options.load, options.iteration)
    # A missing or bad tokenizer fails before the weights are read.
    tokenizer = _tokenizer_state(options, (read_common(path).get("export") or {}).get("tokenizer"), path)
    architectures = []
    loaded = load_checkpoint_tp1(options.load, options.iteration, train_argv,
                                 check_args=lambda a: architectures.append(choose_architecture(a)))
    architecture, args = architectures[0], loaded.args
    dtype = DTYPES[options.dtype] if options.dtype else dtype_from_args(args)
    hf = build_hf_model(loaded.model, args, architecture, tokenizer, dtype)
    print(f"{loaded.path}: iteration {loaded.iteration}, {architecture} ({type(hf).__name__}), "
          f"vocabulary {tokenizer['vocab_size']} (of {args.padded_vocab_size} rows), {str(dtype)[6:]}", flush=True)

    verify = options.verify if options.verify is not None else _fits_in_memory(loaded.model)
    result = {}

    def check(directory: str) -> None:
        if not verify:
            return
        import torch

        exported = load_export(directory, torch.float32)
        reference_model = loaded.model.to(dtype).float()  # the export's rounding, compared in fp32
        tokens = fixed_prompts(tokenizer["vocab_size"], args.seq_length)
        reference = megatron_logits(reference_model, tokens)[..., :exported.config.vocab_size]
        result.update(compare_logits(reference, hf_logits(exported, tokens)))
        print(f"verify: max abs logit diff {result['max_abs_logit_diff']:.3e}, mean KL {result['mean_kl']:.3e} "
              f"({tokens.shape[0]} prompts x {tokens.shape[1]} tokens)", flush=True)
        if result["max_abs_logit_diff"] > TOLERANCE or result["mean_kl"] > TOLERANCE:
            raise _VerifyFailed()

    try:
        write_export(hf, tokenizer, options.output, options.max_shard_size, args.seq_length, check)
    except _VerifyFailed:
        print(f"verify FAILED: beyond {TOLERANCE}; nothing written", file=sys.stderr, flush=True)
        return 1
    print(f"wrote {options.output}", flush=True)
    return 0


class _VerifyFailed(Exception):
    pass


if __name__ == "__main__":
    sys.exit(main())
