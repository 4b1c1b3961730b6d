"""Runs `pretrain()` from pretrain_cocomix.py under a launcher and writes the run summary as JSON.

Usage: <launcher> tests/distributed/driver.py SUMMARY_JSON [pretrain flags...]
The last rank (which holds the loss) writes the summary: train history, validation losses, iteration.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import pretrain_cocomix  # noqa: E402
from megatron_cocomix.distributed import destroy_distributed  # noqa: E402


def main() -> None:
    summary_path, argv = sys.argv[1], sys.argv[2:]
    summary = pretrain_cocomix.main(argv)
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(summary_path, "w") as f:
            json.dump(summary, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
