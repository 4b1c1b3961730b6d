"""Evaluate a TopK SAE on a teacher layer: FVU, L0, dead fraction and delta LM loss.

    python tools/eval_sae.py --sae SAE --teacher-model MODEL --teacher-layer 6 --data-path PREFIX \
        --seq-length 128 [--num-sequences 64]

FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the evaluated tokens (the mean over the tokens; teacher
scale, after the SAE's own de-normalisation); L0 = mean active (positive) latents per token; dead fraction =
latents that fired on none of the evaluated tokens; delta LM loss = next-token CE with x_hat spliced in at
hidden_states[layer] (every position, the skipped ones too) minus the clean CE, each the mean over windows of the
window's mean CE. The evaluated tokens leave out the first --skip-positions of each window. Windows: the last
--num-sequences windows of --seq-length tokens of PREFIX (the ones tools/train_sae.py holds out with the same
--eval-sequences). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.arguments import TEACHER_DTYPE_CHOICES  # noqa: E402
from megatron_cocomix.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a TopK SAE on a teacher layer.", allow_abbrev=False)
    p.add_argument("--sae", required=True, help="OpenAI .pt, SAELens folder or sparsify folder.")
    p.add_argument("--teacher-model", required=True, help="Local Hugging Face model directory or .gguf file.")
    p.add_argument("--teacher-layer", type=int, required=True, help="Hook: the teacher's hidden_states[layer].")
    p.add_argument("--teacher-dtype", choices=TEACHER_DTYPE_CHOICES, default="fp32",
                   help="Precision of the frozen teacher (as pretrain_cocomix.py's flag).")
    p.add_argument("--data-path", required=True, help="Prefix of a tokenised .bin/.idx dataset.")
    p.add_argument("--seq-length", type=int, default=128, help="Tokens per window.")
    p.add_argument("--num-sequences", type=int, default=16, help="Windows evaluated (the last ones of the data).")
    p.add_argument("--batch-size", type=int, default=8, help="Windows per teacher forward.")
    p.add_argument("--skip-positions", type=int, default=1, help="Leading positions left out of FVU / L0.")
    p.add_argument("--output", default=None, help="Also write the JSON result to this file.")
    p.add_argument("--no-progress", action="store_true", help="No tqdm progress bar.")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_cocomix.concepts import check_teacher_sae, load_sae, load_teacher
    from megatron_cocomix.concepts.sae_training import TokenWindows, evaluate_sae

    for name in ("seq_length", "num_sequences", "batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.skip_positions < args.seq_length:
        raise ValueError(f"--skip-positions {args.skip_positions} must be in [0, --seq-length {args.seq_length})")
    teacher = load_teacher(args.teacher_model, args.teacher_layer, dtype=args.teacher_dtype)
    sae = load_sae(args.sae, device=teacher.device).freeze()
    check_teacher_sae(teacher, sae)
    windows = TokenWindows(args.data_path, args.seq_length)
    first = max(0, len(windows) - args.num_sequences)
    ids = list(range(first, len(windows)))
    from tqdm import tqdm

    starts = tqdm(range(0, len(ids), args.batch_size), desc="eval_sae", unit="batch", disable=args.no_progress)
    batches = (windows.batch(ids[i:i + args.batch_size]) for i in starts)
    result = evaluate_sae(sae, teacher, batches, skip_positions=args.skip_positions)
    result.update(sae=args.sae, teacher_model=args.teacher_model, teacher_layer=args.teacher_layer)
    print(json.dumps(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
