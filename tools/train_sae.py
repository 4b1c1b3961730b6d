"""Train a TopK SAE on a teacher layer's activations streamed from a .bin/.idx dataset (OpenAI recipe).

    python tools/train_sae.py --teacher-model MODEL --teacher-layer 6 --data-path PREFIX --seq-length 128 \
        --num-latents 4608 --k 32 --train-iters 2000 --save checkpoints/sae [--tensorboard-dir tb]
    torchrun --nproc_per_node 8 tools/train_sae.py ...          # data-parallel (NCCL on GPU, gloo on CPU)

Data: the token stream of PREFIX is cut into windows of --seq-length; the last --eval-sequences windows are held
out for the final evaluation. Each epoch visits the other windows in a seeded random order; at step s rank r
reads windows [(s * world + r) * B, ... + B) of that order (B = --sequences-per-step), runs the teacher up to
the hooked layer and trains on the B x (seq_length - skip_positions) activations [n, d]. Because the data of a
step depends only on (seed, step, rank), resuming from a checkpoint continues the exact same stream (a resume
that changes --seq-length, --sequences-per-step, --seed, --eval-sequences or the world size is refused). The ranks
of a step together read the windows one process reads with --sequences-per-step W x B, and the loss is that of
the whole batch (sae_training.py), so W processes train the SAE one process trains with W x B windows per step.
The maths (FVU, AuxK, decoder projection, geometric-median pre_bias) is in megatron_cocomix/concepts/sae_training.py.

Checkpoints: SAVE/iter_XXXXXXX/ in the SAELens layout (cfg.json + sae_weights.safetensors, loadable with
`load_sae`) plus trainer_state.pt (optimizer, dead-latent counters, step); SAVE/latest_checkpointed_iteration.txt.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_cocomix.arguments import TEACHER_DTYPE_CHOICES  # noqa: E402
from megatron_cocomix.distributed import init_data_parallel  # noqa: E402
from megatron_cocomix.errors import cli_main  # noqa: E402

LATEST = "latest_checkpointed_iteration.txt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a TopK SAE on a teacher layer (OpenAI recipe).", allow_abbrev=False)
    p.add_argument("--teacher-model", required=True, help="Local Hugging Face model directory or .gguf file.")
    p.add_argument("--teacher-layer", type=int, required=True, help="Hook: the teacher's hidden_states[layer].")
    p.add_argument("--teacher-dtype", choices=TEACHER_DTYPE_CHOICES, default="fp32",
                   help="Precision of the frozen teacher (as pretrain_cocomix.py's flag).")
    p.add_argument("--data-path", required=True, help="Prefix of a tokenised .bin/.idx dataset (teacher's tokenizer).")
    p.add_argument("--seq-length", type=int, default=128, help="Tokens per window fed to the teacher.")
    p.add_argument("--num-latents", type=int, default=None, help="SAE width C (default 8 x teacher width).")
    p.add_argument("--k", type=int, default=32, help="Active latents per token.")
    p.add_argument("--train-iters", type=int, required=True, help="Optimizer steps.")
    p.add_argument("--sequences-per-step", type=int, default=16, help="Windows per rank per step.")
    p.add_argument("--skip-positions", type=int, default=1,
                   help="Leading positions of each window left out of training (their activations are outliers).")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4 x sqrt(2^14 / C)).")
    p.add_argument("--k-aux", type=int, default=None, help="AuxK latents (default teacher width / 2).")
    p.add_argument("--aux-coef", type=float, default=1 / 32, help="AuxK loss coefficient.")
    p.add_argument("--dead-tokens", type=int, default=10_000_000,
                   help="A latent is dead after not firing for this many tokens (all ranks together).")
    p.add_argument("--clip-grad", type=float, default=1.0, help="Gradient-norm clipping (0: off).")
    p.add_argument("--median-sequences", type=int, default=32, help="Windows whose activations initialise pre_bias.")
    p.add_argument("--eval-sequences", type=int, default=16, help="Held-out windows for the final evaluation.")
    p.add_argument("--seed", type=int, default=1234, help="Seed of the SAE init and of the window order.")
    p.add_argument("--save", default=None, help="Checkpoint directory.")
    p.add_argument("--save-interval", type=int, default=None, help="Steps between checkpoints (default: at the end).")
    p.add_argument("--load", default=None, help="Resume from this checkpoint directory (default: --save if it has one).")
    p.add_argument("--tensorboard-dir", default=None, help="Write tensorboard scalars here.")
    p.add_argument("--log-interval", type=int, default=10, help="Steps between log lines / tensorboard writes.")
    p.add_argument("--no-progress", action="store_true", help="No tqdm progress bar.")
    return p


def _validate(args: argparse.Namespace) -> None:
    for name in ("seq_length", "train_iters", "sequences_per_step", "k", "median_sequences", "eval_sequences"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.skip_positions < args.seq_length:
        raise ValueError(f"--skip-positions {args.skip_positions} must be in [0, --seq-length {args.seq_length})")
    if args.num_latents is not None and args.num_latents < args.k:
        raise ValueError(f"--num-latents {args.num_latents} is smaller than --k {args.k}")


@functools.lru_cache(maxsize=4)
def window_order(num_windows: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The seeded random order of the training windows in one epoch (epoch -1: the pre_bias sample)."""
    return tuple(torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def step_windows(step: int, rank: int, world: int, per_rank: int, num_train: int, seed: int) -> list[int]:
    """Window ids of (step, rank): consecutive slices of the per-epoch orders, wrapping across epochs."""
    start = (step * world + rank) * per_rank
    return [window_order(num_train, seed, position // num_train)[position % num_train]
            for position in range(start, start + per_rank)]


def activations(teacher, windows, ids: list[int], skip: int) -> torch.Tensor:
    hidden = teacher.hidden(windows.batch(ids))
    return hidden[:, skip:].reshape(-1, teacher.d_model).float()


def save_checkpoint(save_dir: str, sae, trainer, args: argparse.Namespace, world: int) -> str:
    from megatron_cocomix.concepts import save_saelens

    folder = os.path.join(save_dir, f"iter_{trainer.step_count:07d}")
    save_saelens(sae, folder, extra_config={
        "hook_name": f"hidden_states.{args.teacher_layer}", "model_name": os.path.abspath(args.teacher_model),
        "trained_steps": trainer.step_count,
        "train_sae_args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, type(None)))},
        "world_size": world})
    tmp = os.path.join(folder, "trainer_state.pt.tmp")
    torch.save(trainer.state_dict(), tmp)
    os.replace(tmp, os.path.join(folder, "trainer_state.pt"))
    with open(os.path.join(save_dir, LATEST + ".tmp"), "w") as f:
        f.write(str(trainer.step_count))
    os.replace(os.path.join(save_dir, LATEST + ".tmp"), os.path.join(save_dir, LATEST))
    return folder


def latest_checkpoint(load_dir: str) -> str | None:
    path = os.path.join(load_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"--load {load_dir}: {LATEST} holds {text!r}, not an iteration number")
    folder = os.path.join(load_dir, f"iter_{int(text):07d}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--load {load_dir}: {LATEST} points to missing {folder}")
    return folder


# What fixes the window stream besides the step (see the module docstring): a resumed run must keep them.
STREAM_ARGS = ("seq_length", "sequences_per_step", "seed", "eval_sequences")


def _check_same_stream(resume: str, args: argparse.Namespace, world: int) -> None:
    """One error line when the resumed run would read other windows than the saved one went on to read."""
    with open(os.path.join(resume, "cfg.json")) as f:
        cfg = json.load(f)
    saved = dict(cfg.get("train_sae_args") or {}, world_size=cfg.get("world_size", world))
    ours = dict(vars(args), world_size=world)
    changed = [f"{name} {saved[name]} -> {ours[name]}" for name in STREAM_ARGS + ("world_size",)
               if name in saved and saved[name] != ours[name]]
    if changed:
        raise ValueError(f"--load {resume}: resumed with {', '.join(changed)}; the windows of each step depend on "
                         f"--seq-length, --sequences-per-step, --seed, --eval-sequences and the world size")


def train(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from megatron_cocomix.concepts import TopKSAE, check_sae_compatible, load_sae, load_teacher
    from megatron_cocomix.concepts.sae_training import SAETrainer, TokenWindows, evaluate_sae

    rank, world, device = init_data_parallel()
    teacher = load_teacher(args.teacher_model, args.teacher_layer, dtype=args.teacher_dtype, device=device)
    windows = TokenWindows(args.data_path, args.seq_length)
    num_train = len(windows) - args.eval_sequences
    if num_train < args.sequences_per_step * world:
        raise ValueError(f"--data-path {args.data_path}: {len(windows)} windows of {args.seq_length} tokens, too few "
                         f"for --eval-sequences {args.eval_sequences} plus one step of {args.sequences_per_step} x "
                         f"{world} ranks")
    if int(windows.tokens.max()) >= teacher.vocab_size:
        raise ValueError(f"--data-path {args.data_path}: token id {int(windows.tokens.max())} is outside the vocabulary "
                         f"of teacher {args.teacher_model} ({teacher.vocab_size}); tokenise with the teacher's tokenizer")
    num_latents = args.num_latents or 8 * teacher.d_model

    load_dir = args.load or args.save
    resume = latest_checkpoint(load_dir) if load_dir else None
    if args.load and resume is None:
        raise FileNotFoundError(f"--load {args.load}: no {LATEST} in this directory")
    torch.manual_seed(args.seed)
    if resume:
        sae = load_sae(resume, device=device)
        check_sae_compatible(sae, d_model=teacher.d_model, num_latents=num_latents, k=args.k,
                             where=f"--num-latents/--k of this run (resuming {resume})")
    else:
        sae = TopKSAE(teacher.d_model, num_latents, args.k, source="trained SAE").to(device)
    trainer = SAETrainer(sae, lr=args.lr, k_aux=args.k_aux, aux_coef=args.aux_coef, dead_tokens=args.dead_tokens,
                         clip_grad=args.clip_grad)
    if resume:
        trainer.load_state_dict(torch.load(os.path.join(resume, "trainer_state.pt"), map_location=device,
                                           weights_only=True))
        _check_same_stream(resume, args, world)
    else:
        sample_ids = list(window_order(num_train, args.seed, -1)[:args.median_sequences])
        trainer.init_pre_bias(activations(teacher, windows, sample_ids, args.skip_positions).to(device))

    writer = None
    if rank == 0 and args.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.tensorboard_dir)
    tokens_per_step = args.sequences_per_step * (args.seq_length - args.skip_positions) * world
    bar = tqdm(total=args.train_iters, initial=trainer.step_count, desc="train_sae", unit="step",
               disable=rank != 0 or args.no_progress)
    history = []
    start = time.time()
    while trainer.step_count < args.train_iters:
        ids = step_windows(trainer.step_count, rank, world, args.sequences_per_step, num_train, args.seed)
        metrics = trainer.step(activations(teacher, windows, ids, args.skip_positions))
        history.append(metrics)
        bar.update(1)
        bar.set_postfix(fvu=f"{metrics['fvu']:.4f}", l0=f"{metrics['l0']:.1f}", dead=f"{metrics['dead_fraction']:.3f}")
        step = trainer.step_count
        if writer and (step % args.log_interval == 0 or step == args.train_iters):
            for name, value in metrics.items():
                writer.add_scalar(f"sae/{name}", value, step)
            writer.add_scalar("sae/tokens_per_second", tokens_per_step * len(history) / (time.time() - start), step)
        if args.save and rank == 0 and args.save_interval and step % args.save_interval == 0:
            save_checkpoint(args.save, sae, trainer, args, world)
    bar.close()
    train_seconds = time.time() - start
    if args.save and rank == 0 and (not args.save_interval or trainer.step_count % args.save_interval != 0
                                    or not history):
        save_checkpoint(args.save, sae, trainer, args, world)

    eval_ids = list(range(num_train, len(windows)))
    batches = [windows.batch(eval_ids[i:i + args.sequences_per_step])
               for i in range(0, len(eval_ids), args.sequences_per_step)]
    result = evaluate_sae(sae, teacher, batches, skip_positions=args.skip_positions)
    result.update(steps=trainer.step_count, train_fvu_first=history[0]["fvu"] if history else None,
                  train_fvu_last=history[-1]["fvu"] if history else None,
                  train_dead_fraction=trainer.dead_mask().float().mean().item(),
                  tokens_per_second=tokens_per_step * len(history) / max(train_seconds, 1e-9))
    if rank == 0:
        if writer:
            for name in ("fvu", "l0", "dead_fraction", "delta_lm_loss"):
                writer.add_scalar(f"eval/{name}", result[name], trainer.step_count)
            writer.close()
        if args.save:
            with open(os.path.join(args.save, "eval.json"), "w") as f:
                json.dump(result, f, indent=2)
        print(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()
    return result


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _validate(args)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
