"""Build a tiny random GPT-2 teacher and a tiny random TopK SAE for CPU runs of CoCoMix (examples/tiny_cocomix_cpu.sh).

    python tools/make_tiny_teacher.py --output-dir runs/tiny_cocomix/assets \
        --vocab-file examples/data/gpt2/encoder.json --merge-file examples/data/gpt2/vocab.bpe

writes
    OUTPUT_DIR/teacher/   a Hugging Face GPT-2 directory (config.json, model.safetensors) built from a GPT2Config
                          (--layers x --hidden, --heads, --positions) with the GPT-2 BPE tokenizer files, so it
                          tokenises exactly like a student trained with --tokenizer-type GPT2BPETokenizer
    OUTPUT_DIR/sae/       a SAELens folder (cfg.json + sae_weights.safetensors) of a TopKSAE
                          d_model = --hidden, C = --num-latents, k = --sae-k, with input LayerNorm
Both are random (seeded by --seed): the teacher's attribution labels are then a fixed function of the context
(its gradient through the SAE's top-k code), which a student can learn to predict; they carry no linguistic
meaning. The real run uses GPT-2 124M and OpenAI's 32768-latent SAE (SIZE=69m bash examples/pretrain_paper.sh).
The tool is idempotent: existing outputs are kept unless --force. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a tiny random GPT-2 teacher and TopK SAE for CPU CoCoMix runs.",
                                allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", required=True, help="Writes OUTPUT_DIR/teacher and OUTPUT_DIR/sae.")
    p.add_argument("--vocab-file", default=os.path.join(REPO, "examples", "data", "gpt2", "encoder.json"),
                   help="GPT-2 BPE vocabulary.")
    p.add_argument("--merge-file", default=os.path.join(REPO, "examples", "data", "gpt2", "vocab.bpe"),
                   help="GPT-2 BPE merges.")
    p.add_argument("--layers", type=int, default=3, help="Teacher transformer blocks.")
    p.add_argument("--hidden", type=int, default=64, help="Teacher width (= the SAE's d_model).")
    p.add_argument("--heads", type=int, default=4, help="Teacher attention heads.")
    p.add_argument("--positions", type=int, default=256, help="Teacher context (>= the student's --seq-length).")
    p.add_argument("--num-latents", type=int, default=512, help="SAE latents C (the student's --concept-dim).")
    p.add_argument("--sae-k", type=int, default=8, help="SAE active latents per token.")
    p.add_argument("--seed", type=int, default=0, help="Seed of both random initialisations.")
    p.add_argument("--force", action="store_true", help="Rebuild outputs that already exist.")
    return p


def _validate(args: argparse.Namespace) -> None:
    for flag in ("layers", "hidden", "heads", "positions", "num_latents", "sae_k"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.hidden % args.heads != 0:
        raise ValueError(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if args.sae_k > args.num_latents:
        raise ValueError(f"--sae-k {args.sae_k} is larger than --num-latents {args.num_latents}")
    for flag in ("vocab_file", "merge_file"):
        if not os.path.isfile(getattr(args, flag)):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: no such file")
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--output-dir {args.output_dir}: parent directory {parent} does not exist")


def write_teacher(path: str, args: argparse.Namespace) -> None:
    """A GPT2LMHeadModel from a GPT2Config (random weights) plus the GPT-2 tokenizer, in a temporary dir renamed
    into place, so an interrupted run never leaves a half-written teacher."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from megatron_cocomix.concepts.teacher import check_teacher_tokenizer
    from megatron_cocomix.data.tokenizer import build_tokenizer_from_flags

    tokenizer = GPT2TokenizerFast(vocab=args.vocab_file, merges=args.merge_file)
    eod = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.positions, n_embd=args.hidden,
                        n_layer=args.layers, n_head=args.heads, bos_token_id=eod, eos_token_id=eod,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    GPT2LMHeadModel(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # The same check training runs: the teacher must give the student tokenizer's ids.
    check_teacher_tokenizer(tmp, build_tokenizer_from_flags("GPT2BPETokenizer", args.vocab_file, args.merge_file))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def write_sae(path: str, args: argparse.Namespace) -> None:
    import torch

    from megatron_cocomix.concepts.sae import TopKSAE, save_saelens

    torch.manual_seed(args.seed + 1)
    sae = TopKSAE(d_model=args.hidden, num_latents=args.num_latents, k=args.sae_k, normalize_input=True,
                  source="tools/make_tiny_teacher.py")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_saelens(sae, tmp, extra_config={"source": "random (tools/make_tiny_teacher.py)", "seed": args.seed})
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _validate(args)
    os.makedirs(args.output_dir, exist_ok=True)
    teacher_dir, sae_dir = os.path.join(args.output_dir, "teacher"), os.path.join(args.output_dir, "sae")
    if args.force or not os.path.isfile(os.path.join(teacher_dir, "config.json")):
        write_teacher(teacher_dir, args)
        print(f"wrote {teacher_dir}: random GPT-2, {args.layers} layers x {args.hidden}, {args.heads} heads")
    else:
        print(f"kept {teacher_dir} (--force rebuilds it)")
    if args.force or not os.path.isfile(os.path.join(sae_dir, "cfg.json")):
        write_sae(sae_dir, args)
        print(f"wrote {sae_dir}: random TopK SAE, d_model {args.hidden}, {args.num_latents} latents, "
              f"k {args.sae_k}")
    else:
        print(f"kept {sae_dir} (--force rebuilds it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
