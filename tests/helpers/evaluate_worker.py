"""Runs tools/evaluate.py's main several times in one launch (each rank in lockstep), to save start-up time.

Usage: <launcher> tests/helpers/evaluate_worker.py SPEC_JSON RESULT_JSON
(with the repository root on PYTHONPATH, as tests/helpers/launch.py's test_env() sets it)
SPEC_JSON is a list of evaluate.py argument lists. Rank 0 writes [[exit status, stderr of rank 0, stderr of rank
1, ...] per run]: what each rank said, to show that a bad input is one line from one rank.
"""

import contextlib
import io
import json
import sys

import torch

from megatron_cocomix.distributed import destroy_distributed
from tools import evaluate


def main() -> None:
    spec_path, result_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        runs = json.load(f)
    results = []
    for argv in runs:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = evaluate.main([*argv, "--no-progress"])
        results.append((code, err.getvalue()))
    from megatron_cocomix.evaluation import parallel

    parallel.init_world()  # a no-op unless every run was refused before setting it up
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump([[code] + [ranks[i][1] for ranks in gathered] for i, (code, _) in enumerate(results)], f)
    destroy_distributed()


if __name__ == "__main__":
    main()
