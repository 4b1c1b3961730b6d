"""Precompute CoCoMix concept labels for exactly the training samples that the training flags produce.

    python tools/extract_concepts.py --teacher-model MODEL --teacher-layer 6 --sae SAE --concept-num-labels 4 \
        --data-path PREFIX --split 969,30,1 --seq-length 1024 --seed 1234 --train-iters N --global-batch-size B \
        --tokenizer-type GPT2BPETokenizer --vocab-file ... --merge-file ... --output-prefix labels/owt
    torchrun --nproc_per_node 8 tools/extract_concepts.py ...      # data-parallel

The flags are training's own (megatron_cocomix.arguments.build_parser), so a training command line can be
reused as is plus --output-prefix. The training dataset is built by megatron_cocomix.data.datasets with
train_iters x global_batch_size samples, as training does; sample i's `tokens` [seq_length] (the student's
context window) go through the teacher and SAE (attribution_labels), giving labels [seq_length, num_labels].

Work is split into chunks of --chunk-samples consecutive samples; chunk c goes to rank c mod world. Each finished
chunk is written as OUTPUT.parts/chunk_XXXXXX.{bin,idx} plus a .done marker, so an interrupted run resumes at
the first unfinished chunk (with any number of processes). When all chunks exist, rank 0 concatenates them in
sample order into OUTPUT.{bin,idx}, writes the fingerprint OUTPUT.json last and removes the parts.

--teacher-states-prefix STATES also keeps the teacher's final hidden states of the same samples, from the same
forward (megatron_cocomix/data/teacher_states.py: 4 x d_model bytes per token), in the same chunks, merged into
STATES.{bin,idx,json}: pretrain_cocomix.py --kd --kd-teacher-states STATES then trains the KD baseline on the
teacher's exact distributions without a teacher forward per step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_cocomix.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from megatron_cocomix.arguments import build_parser as training_parser

    parser = training_parser()
    parser.description = "Precompute CoCoMix concept labels for the training samples of these flags."
    g = parser.add_argument_group("concept label extraction")
    g.add_argument("--output-prefix", required=True, help="Write OUTPUT_PREFIX.{bin,idx,json}.")
    g.add_argument("--extract-batch-size", type=int, default=None,
                   help="Sequences per teacher forward (default --micro-batch-size, else 8).")
    g.add_argument("--chunk-samples", type=int, default=256, help="Samples per resumable chunk.")
    g.add_argument("--teacher-states-prefix", default=None,
                   help="Also write the teacher's final hidden states of the same samples (float32, d_model per "
                        "token) to TEACHER_STATES_PREFIX.{bin,idx,json}, for pretrain_cocomix.py --kd-teacher-states.")
    g.add_argument("--no-tokenizer-check", action="store_true",
                   help="Skip comparing the teacher's tokenizer with the data tokenizer (NullTokenizer data).")
    g.add_argument("--no-progress", action="store_true", help="No tqdm progress bar.")
    g.add_argument("--eval-split", choices=["valid", "test"], default=None,
                   help="Label the held-out windows that tools/evaluate.py scores (the documents --split gives to "
                        "this split, concatenated and cut into --seq-length windows) instead of the training "
                        "samples; evaluate.py --concept-labels reads the result.")
    g.add_argument("--max-documents", type=int, default=None,
                   help="With --eval-split: only the first N documents (as evaluate.py's flag).")
    return parser


def _validate(args: argparse.Namespace) -> None:
    from megatron_cocomix.arguments import validate_data_args

    sizes = ("seq_length",) if args.eval_split else ("seq_length", "train_iters", "global_batch_size")
    for flag in ("teacher_model", "teacher_layer", "sae") + sizes:
        if getattr(args, flag) is None:
            raise ValueError(f"--{flag.replace('_', '-')} is required (use the training run's value)")
    if args.teacher_states_prefix and args.eval_split:
        raise ValueError("--teacher-states-prefix keeps the states of training samples, for the KD student: not with "
                         "--eval-split")
    if args.max_documents is not None and not args.eval_split:
        raise ValueError("--max-documents needs --eval-split (it selects held-out documents)")
    if args.eval_split and (not args.data_path or len(args.data_path) != 1):
        raise ValueError(f"--eval-split labels the documents of one --data-path prefix, got {args.data_path}")
    for flag in sizes + ("chunk_samples", "concept_num_labels"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.extract_batch_size is None:
        args.extract_batch_size = args.micro_batch_size or 8
    if args.extract_batch_size <= 0:
        raise ValueError(f"--extract-batch-size must be positive, got {args.extract_batch_size}")
    validate_data_args(args)  # the same checks and defaults (e.g. --split) as training
    for flag in ("teacher_model", "sae"):
        if not os.path.exists(getattr(args, flag)):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: no such file or directory")


def _init_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, created): joins torchrun's group, or makes a one-process group (megatron's dataset
    builder needs one); `created` says whether this call made the group (and should destroy it)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, False
    backend = args.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
    timeout = datetime.timedelta(minutes=args.distributed_timeout_minutes)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device, True


def _chunk_prefix(parts: str, chunk: int) -> str:
    return os.path.join(parts, f"chunk_{chunk:06d}")


def _check_parts_fingerprint(parts: str, fingerprint: dict, rank: int) -> None:
    """A parts directory from another configuration must not be mixed into this one."""
    from megatron_cocomix.data.concept_labels import check_fingerprint

    path = os.path.join(parts, "fingerprint.json")
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
        if not os.path.exists(path):
            with open(path + ".tmp", "w") as f:
                json.dump(fingerprint, f, indent=2, sort_keys=True)
            os.replace(path + ".tmp", path)
    dist.barrier()
    with open(path) as f:
        saved = json.load(f)
    try:
        check_fingerprint(saved, fingerprint, parts)
    except ValueError as e:
        raise ValueError(f"{e} (unfinished parts of another run: remove {parts} to start over)") from None


def extract(args: argparse.Namespace) -> dict:
    rank, world, device, created = _init_distributed(args)
    result = _extract(args, rank, world, device)
    if created and dist.is_initialized():
        # Every rank leaves its last collective before any rank tears the group down: a gloo rank destroyed
        # while a peer is still inside a collective can abort the peer at exit.
        dist.barrier()
        dist.destroy_process_group()
    return result


def _extract(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    from tqdm import tqdm

    from megatron_cocomix.concepts import check_sae_compatible, check_teacher_tokenizer, sae_fingerprint
    from megatron_cocomix.concepts.labeling import AttributionLabeler
    from megatron_cocomix.data.concept_labels import ConceptLabelsWriter, expected_fingerprint, write_fingerprint
    from megatron_cocomix.data.datasets import build_train_valid_test_datasets
    from megatron_cocomix.data.teacher_states import TeacherStatesWriter
    from megatron_cocomix.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args)
    labeler = AttributionLabeler(args.teacher_model, args.teacher_layer, args.sae, args.concept_num_labels,
                                 args.concept_attribution, args.concept_label_masking, args.teacher_dtype, device,
                                 teacher_lm_head=args.teacher_lm_head)
    teacher, sae = labeler.teacher, labeler.sae
    keep_states = bool(args.teacher_states_prefix)
    check_sae_compatible(sae, num_latents=args.concept_dim, where="--concept-dim")
    if tokenizer.vocab_size > teacher.vocab_size:
        raise ValueError(f"the data tokenizer has {tokenizer.vocab_size} ids but teacher {args.teacher_model} only "
                         f"{teacher.vocab_size}: the teacher must share the student's tokenizer")
    if not args.no_tokenizer_check and args.tokenizer_type != "NullTokenizer":
        check_teacher_tokenizer(args.teacher_model, tokenizer)

    held_out = {}
    if args.eval_split:
        windows, held_out = _held_out_windows(args)
        num_samples = len(windows)

        def sample_tokens(i: int) -> torch.Tensor:
            return windows[i]
    else:
        num_samples = args.train_iters * args.global_batch_size
        train_ds, _, _ = build_train_valid_test_datasets(args, tokenizer, [num_samples, 0, 0])

        def sample_tokens(i: int) -> torch.Tensor:
            return torch.as_tensor(train_ds[i]["tokens"])
    fingerprint = {**expected_fingerprint(args, tokenizer, num_samples, sae_fingerprint(args.sae)), **held_out}
    if os.path.exists(args.output_prefix + ".json"):
        from megatron_cocomix.data.concept_labels import ConceptLabelsDataset

        try:
            ConceptLabelsDataset(args.output_prefix).check_fingerprint(fingerprint)
        except ValueError as e:
            raise ValueError(f"--output-prefix {args.output_prefix} already holds other labels ({e}); "
                             "choose another prefix") from None
        if args.teacher_states_prefix:
            _check_complete_states(args, fingerprint)
        if rank == 0:
            print(json.dumps({"output_prefix": args.output_prefix, "num_samples": num_samples, "complete": True}))
        return {"output_prefix": args.output_prefix, "num_samples": num_samples, "complete": True}
    parts = args.output_prefix + ".parts"
    _check_parts_fingerprint(parts, {**fingerprint, "teacher_states": bool(args.teacher_states_prefix)}, rank)

    chunks = list(range(0, num_samples, args.chunk_samples))
    mine = [c for i, c in enumerate(chunks) if i % world == rank]
    todo = [c for c in mine if not os.path.exists(_chunk_prefix(parts, c // args.chunk_samples) + ".done")]
    todo_samples = sum(min(args.chunk_samples, num_samples - c) for c in todo)
    bar = tqdm(total=todo_samples, desc=f"extract_concepts[rank {rank}]", unit="seq",
               disable=args.no_progress or rank != 0)
    start, tokens_done = time.time(), 0
    for first in todo:
        prefix = _chunk_prefix(parts, first // args.chunk_samples)
        writer = ConceptLabelsWriter(prefix, args.seq_length, args.concept_num_labels, sae.num_latents)
        states = TeacherStatesWriter(prefix + ".states", args.seq_length, teacher.d_model) if keep_states else None
        last = min(first + args.chunk_samples, num_samples)
        for begin in range(first, last, args.extract_batch_size):
            ids = range(begin, min(begin + args.extract_batch_size, last))
            tokens = torch.stack([sample_tokens(i) for i in ids])
            with teacher.keeping_final_states() if keep_states else contextlib.nullcontext() as finals:
                labels = labeler(tokens)
            writer.add(labels)
            if states is not None:
                states.add(torch.cat(finals))
            tokens_done += tokens.numel()
            bar.update(len(ids))
        writer.finalize()
        if states is not None:
            states.finalize()
        open(prefix + ".done", "w").close()
    bar.close()
    elapsed = time.time() - start
    dist.barrier()

    if rank == 0:
        if keep_states:  # complete before the labels' fingerprint, which marks the whole extraction complete
            _merge_states(args, parts, len(chunks), fingerprint, teacher.d_model, num_samples)
        merged = ConceptLabelsWriter(args.output_prefix, args.seq_length, args.concept_num_labels, sae.num_latents)
        for index in range(len(chunks)):
            prefix = _chunk_prefix(parts, index)
            if not os.path.exists(prefix + ".done"):
                raise RuntimeError(f"chunk {prefix} is missing after all ranks finished")
            merged.add_shard(prefix)
        merged.finalize()
        if merged.num_samples != num_samples:
            raise RuntimeError(f"merged {merged.num_samples} samples, expected {num_samples}")
        write_fingerprint(args.output_prefix, fingerprint, args.seq_length, args.concept_num_labels,
                          sae.num_latents, num_samples)
        shutil.rmtree(parts)
    dist.barrier()
    # On the process group's device: NCCL (CUDA) cannot gather CPU tensors.
    stats = torch.tensor([tokens_done, elapsed], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    total_tokens = sum(float(s[0]) for s in gathered)
    wall = max(float(s[1]) for s in gathered)
    result = {"output_prefix": args.output_prefix, "num_samples": num_samples, "tokens_labelled": int(total_tokens),
              "tokens_per_second": total_tokens / wall if wall > 0 else None, "world_size": world}
    if rank == 0:
        print(json.dumps(result))
    return result


def _merge_states(args: argparse.Namespace, parts: str, num_chunks: int, fingerprint: dict, d_model: int,
                  num_samples: int) -> None:
    from megatron_cocomix.data.teacher_states import TeacherStatesWriter, write_states_fingerprint

    merged = TeacherStatesWriter(args.teacher_states_prefix, args.seq_length, d_model)
    for index in range(num_chunks):
        merged.add_shard(_chunk_prefix(parts, index) + ".states")
    merged.finalize()
    if merged.num_samples != num_samples:
        raise RuntimeError(f"merged {merged.num_samples} teacher states, expected {num_samples}")
    write_states_fingerprint(args.teacher_states_prefix, fingerprint, args.seq_length, d_model, num_samples)


def _check_complete_states(args: argparse.Namespace, fingerprint: dict) -> None:
    """Labels already complete: their states must be too (they are written first), and of the same samples."""
    from megatron_cocomix.data.teacher_states import TeacherStatesDataset

    try:
        TeacherStatesDataset(args.teacher_states_prefix).check_fingerprint(fingerprint)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--output-prefix {args.output_prefix} already holds these labels, but not these teacher "
                         f"states ({e}); choose another --output-prefix to extract both") from None


def _held_out_windows(args: argparse.Namespace) -> tuple[torch.Tensor, dict]:
    """The windows evaluate.py scores for concepts, and the fingerprint keys that say which they are."""
    from megatron_cocomix.evaluation.concepts import concept_windows
    from megatron_cocomix.evaluation.lm import read_documents

    documents = read_documents(args.data_path[0], args.split, args.eval_split, args.max_documents)
    windows = concept_windows(documents.docs, args.seq_length)
    return windows, {"eval_split": args.eval_split, "max_documents": args.max_documents,
                     "document_range": [documents.begin, documents.end], "seed": None, "train_data_path": None}


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _validate(args)
    extract(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
