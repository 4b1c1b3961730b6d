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
    summary_path, argv = sys.argv[1], sys.argv[2:]
    summary = pretrain_cocomix.main(argv)
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(summary_path, "w") as f:
            json.dump(summary, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
