"""Runs `pretrain()` from pretrain_cocomix.py under a launcher and writes the run summary as JSON.

Usage: <launcher> tests/helpers/pretrain_worker.py SUMMARY_JSON [pretrain flags...]
(with the repository root on PYTHONPATH, as tests/helpers/launch.py's test_env() sets it)
The last rank (which holds the loss) writes the summary: train history, validation losses, iteration.
"""

import json
import sys

import torch

import pretrain_cocomix
from megatron_cocomix.distributed import destroy_distributed


def main() -> None:
    # The deepspeed launcher puts --local_rank=N first; the trainer takes it anywhere.
    args = sys.argv[1:]
    local_rank = [a for a in args[:1] if a.startswith("--local_rank")]
    summary_path, argv = args[len(local_rank)], local_rank + args[len(local_rank) + 1:]
    summary = pretrain_cocomix.main(argv)
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(summary_path, "w") as f:
            json.dump(summary, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
