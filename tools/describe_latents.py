"""Describe the latents of an SAE on a teacher layer from held-out documents: per latent its top-activating contexts,
activation frequency, mean activation and the tokens that carry it, as JSON lines (`--latent-descriptions` of
tools/inspect_concepts.py and tools/steer.py reads them) and a self-contained HTML page.

    python tools/describe_latents.py --teacher-model MODEL --teacher-layer 6 --sae SAE \
        --data-path PREFIX --split 969,30,1 --eval-split test --seq-length 128 --max-tokens 32768 \
        --output latents.jsonl --html latents.html
    torchrun --nproc_per_node 8 tools/describe_latents.py ...      # data-parallel

The documents are those evaluate.py scores (the --eval-split part of --split, or all documents of the prefix),
concatenated and cut into --seq-length windows, the first --max-tokens tokens' worth of them. The teacher runs
up to hidden_states[--teacher-layer], the SAE encodes it, and each latent keeps its statistics; each process reads
every world-th window and rank 0 merges and writes. The maths and the JSON-lines schema:
megatron_cocomix/concepts/descriptions.py. Nothing is checkpointed: the tokens are bounded and the run takes
seconds to minutes (a re-run starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from megatron_cocomix.concepts.teacher import TEACHER_DTYPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    model = p.add_argument_group("teacher and SAE (training's flags)")
    model.add_argument("--teacher-model", required=True, metavar="MODEL",
                       help="Local Hugging Face model directory or .gguf file.")
    model.add_argument("--teacher-layer", type=int, required=True, metavar="N",
                       help="The SAE reads the teacher's hidden_states[N].")
    model.add_argument("--sae", required=True, help="TopK SAE: OpenAI .pt, SAELens folder or sparsify folder.")
    model.add_argument("--teacher-dtype", choices=list(TEACHER_DTYPES), default="fp32",
                       help="Precision of the frozen teacher (fp32).")
    data = p.add_argument_group("documents (evaluate.py's flags)")
    data.add_argument("--data-path", required=True, metavar="PREFIX",
                      help="A .bin/.idx prefix tokenised with the teacher's tokenizer.")
    data.add_argument("--split", default=None, help="Training's --split (with --eval-split).")
    data.add_argument("--eval-split", choices=["train", "valid", "test"], default=None,
                      help="Read the documents --split gives to this part (default: all documents).")
    data.add_argument("--max-documents", type=int, default=None, help="Only the first N of those documents.")
    data.add_argument("--seq-length", type=int, default=128, help="Tokens per teacher window (128).")
    data.add_argument("--max-tokens", type=int, default=None,
                      help="Read at most this many tokens (whole windows; default: all the documents).")
    data.add_argument("--batch-size", type=int, default=8, help="Windows per teacher forward (8).")
    data.add_argument("--skip-positions", type=int, default=1,
                      help="Leading positions of each window not scored (1: outliers, as train_sae.py).")
    out = p.add_argument_group("output")
    out.add_argument("--top-contexts", type=int, default=10, metavar="N", help="Top contexts kept per latent (10).")
    out.add_argument("--context-tokens", type=int, default=8, metavar="W",
                     help="Tokens each side of a context's max-activating token (8).")
    out.add_argument("--top-tokens", type=int, default=5, metavar="T",
                     help="Most frequent tokens listed per latent (5; the description names up to 3).")
    out.add_argument("--output", required=True, metavar="FILE.jsonl", help="Write one JSON line per latent here.")
    out.add_argument("--html", metavar="FILE", help="Also write a self-contained HTML page (one card per latent).")
    out.add_argument("--no-progress", action="store_true", help="No tqdm progress bar.")
    return p


def _validate(args: argparse.Namespace) -> None:
    for name in ("seq_length", "batch_size", "top_contexts", "top_tokens"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.context_tokens < 0:
        raise ValueError(f"--context-tokens must be non-negative, got {args.context_tokens}")
    if not 0 <= args.skip_positions < args.seq_length:
        raise ValueError(f"--skip-positions {args.skip_positions} must be in [0, --seq-length {args.seq_length})")
    if args.max_tokens is not None and args.max_tokens < args.seq_length:
        raise ValueError(f"--max-tokens {args.max_tokens} is less than one window of --seq-length {args.seq_length}")
    for flag, path in (("--output", args.output), ("--html", args.html)):
        if path is not None:
            parent = os.path.dirname(os.path.abspath(path))
            if os.path.isdir(path) or not os.path.isdir(parent):
                raise ValueError(f"{flag} {path}: not a file in an existing directory")
    for flag, path in (("--teacher-model", args.teacher_model), ("--sae", args.sae)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path}: no such file or directory")


def _windows(args: argparse.Namespace):
    """The windows [n, s] of the documents (evaluate.py's concept windows), and a note saying which they are."""
    from megatron_cocomix.evaluation.concepts import concept_windows
    from megatron_cocomix.evaluation.lm import read_documents

    documents = read_documents(args.data_path, args.split, args.eval_split, args.max_documents)
    limit = None if args.max_tokens is None else args.max_tokens // args.seq_length
    windows = concept_windows(documents.docs, args.seq_length, limit)
    part = f"the {documents.eval_split} split ({documents.split})" if documents.eval_split else "all documents"
    note = (f"data {args.data_path}: {part}, {len(documents.docs)} documents from #{documents.begin}; "
            f"{windows.shape[0]} windows of {args.seq_length} tokens")
    return windows, note


def describe(args: argparse.Namespace) -> Optional[dict]:
    """Run on every rank; rank 0 writes the outputs and returns the summary (the other ranks return None)."""
    import torch
    from tqdm import tqdm

    from megatron_cocomix.concepts import check_teacher_sae, load_sae, load_teacher, load_teacher_tokenizer
    from megatron_cocomix.concepts.descriptions import LatentStats, collect, latent_records, write_jsonl
    from megatron_cocomix.distributed import init_data_parallel

    rank, world, device = init_data_parallel()
    start = time.time()
    windows, data_note = _windows(args)
    teacher = load_teacher(args.teacher_model, args.teacher_layer, dtype=args.teacher_dtype, device=device)
    sae = load_sae(args.sae, device=teacher.device).freeze()
    check_teacher_sae(teacher, sae)
    if int(windows.max()) >= teacher.vocab_size:
        raise ValueError(f"--data-path {args.data_path}: token id {int(windows.max())} is outside the vocabulary of "
                         f"teacher {args.teacher_model} ({teacher.vocab_size}); tokenise with the teacher's tokenizer")
    try:
        tokenizer = load_teacher_tokenizer(args.teacher_model)
    except OSError as e:
        raise ValueError(f"--teacher-model {args.teacher_model}: no tokenizer to decode the contexts with "
                         f"({type(e).__name__})") from None

    stats = LatentStats(sae.num_latents, teacher.vocab_size, args.seq_length, args.top_contexts,
                        args.context_tokens, args.skip_positions)
    total = windows.numel()
    bar = tqdm(total=total, desc="describe_latents", unit="tok", unit_scale=True,
               disable=args.no_progress or rank != 0)
    collect(teacher, sae, windows, args.batch_size, stats, rank, world, progress=lambda n: bar.update(n * world))
    bar.close()
    if world > 1:
        states = [None] * world if rank == 0 else None
        torch.distributed.gather_object(stats.state(), states, dst=0)
        if rank == 0:
            for state in states[1:]:
                stats.merge(state)
        torch.distributed.barrier()
    if rank != 0:
        return None

    records = latent_records(stats, windows, tokenizer, args.top_tokens)
    write_jsonl(records, args.output)
    elapsed = time.time() - start
    dead = sum(record["dead"] for record in records)
    summary = {"output": args.output, "html": args.html, "latents": len(records), "fired": len(records) - dead,
               "dead": dead, "tokens": stats.tokens, "windows": int(windows.shape[0]), "world_size": world,
               "seconds": round(elapsed, 1)}
    if args.html:
        from megatron_cocomix.concepts.latent_pages import render_latent_page

        notes = [f"SAE {args.sae} ({sae.num_latents} latents, k {sae.k}) on teacher {args.teacher_model} "
                 f"hidden_states[{args.teacher_layer}]", data_note,
                 f"{stats.tokens:,} tokens scored (the first {args.skip_positions} of each window left out); "
                 f"top {args.top_contexts} contexts of ±{args.context_tokens} tokens per latent"]
        name = os.path.join(*os.path.normpath(args.sae).split(os.sep)[-2:])
        page = render_latent_page(records, f"Latents of the SAE {name}", notes)
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(page)
    print(json.dumps(summary))
    return summary


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _validate(args)
    describe(args)
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
