"""Make a DeepSpeed ZeRO checkpoint resumable at another data-parallel size: convert its optimizer state into
DeepSpeed's universal checkpoint (DeepSpeed's own ds_to_universal), once, beside the original files.

    python tools/ds_to_universal.py --load CKPT_DIR [--iteration N] [--workers 2] [--no-progress]

Then resume with any number of data-parallel ranks (and ZeRO stage 1 or 2), the same command otherwise:

    torchrun --nproc_per_node 1 pretrain_cocomix.py --deepspeed --deepspeed_config ds.json --load CKPT_DIR ...

Supported: checkpoints saved with ZeRO-1 or ZeRO-2 at TP1 x PP1 (see
megatron_cocomix/training/backends/deepspeed_universal.py). The original ZeRO files stay, so the run still
resumes at its own layout too; converting twice does nothing. Bad input: one `error:` line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.errors import cli_main  # noqa: E402

# megatron-core announces on import that it runs without Transformer Engine / Apex: noise for a conversion.
warnings.filterwarnings("ignore", message=".*(Transformer Engine and Apex|Apex) (are|is) not installed.*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--load", required=True, help="Checkpoint directory (the training run's --save).")
    parser.add_argument("--iteration", type=int, default=None,
                        help="Iteration to convert (default: the one latest_checkpointed_iteration.txt names).")
    parser.add_argument("--workers", type=int, default=2,
                        help="Processes DeepSpeed's converter extracts and merges the ZeRO shards with.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars (DeepSpeed's tqdm).")
    return parser


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    if options.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {options.workers}")
    if options.no_progress:
        os.environ["TQDM_DISABLE"] = "1"
    from megatron_cocomix.conversion.checkpoint import find_checkpoint, read_common
    from megatron_cocomix.training.backends.deepspeed_universal import (
        OPTIMIZER_DIR,
        UNIVERSAL_TAG,
        read_layout,
        stage_dirs,
        write_universal,
    )

    path = find_checkpoint(options.load, options.iteration)
    backend = read_common(path).get("optimizer_backend")
    if backend != "deepspeed":
        raise ValueError(f"{path} holds {backend} optimizer state, not DeepSpeed's: it needs no conversion (see "
                         f"docs/checkpoints.md for the layouts it loads at)")
    layout = read_layout(path)
    written = write_universal(path, workers=options.workers)
    for directory in stage_dirs(path):
        state = "written" if os.path.join(directory, UNIVERSAL_TAG) in written else "already there"
        print(f"{os.path.join(directory, UNIVERSAL_TAG)}: {state}")
    print(f"{path}: ZeRO-{layout['zero_stage']} state saved at DP{layout['data_parallel_size']} now also loads at "
          f"any data-parallel size and ZeRO stage 1 or 2 ({OPTIMIZER_DIR}/*/{UNIVERSAL_TAG})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
