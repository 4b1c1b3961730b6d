"""Several training runs (and label extractions) one after the other in one launch, to save start-up time.

Usage: <launcher> tests/helpers/multi_run_worker.py SPEC_JSON SUMMARY_JSON
(with the repository root on PYTHONPATH, as tests/helpers/launch.py's test_env() sets it)
SPEC_JSON is a list of [name, kind, argv] with kind
    "pretrain"        pretrain_cocomix.main(argv)
    "pretrain_error"  the same, expected to stop with an `error:` line: its summary is {"exit_code": N}
    "extract"         tools/extract_concepts.py
    "copy"            argv = [checkpoint root, iteration, new root]: rank 0 copies that one checkpoint into a new
                      root whose tracker names it (a run can then resume from the middle of an earlier one)
The process group stays up across runs; megatron's model-parallel state and the cached online teacher are
rebuilt for each run, so each run starts as a fresh launch would (seeds are reset by initialize_distributed).
The last rank (which holds the losses on every layout) writes {name: summary}.
"""

import megatron_cocomix  # noqa: F401  (first, as in pretrain_cocomix.py: start-up time)

# isort: split
import json
import sys

import torch
from megatron.core import parallel_state

import pretrain_cocomix
from megatron_cocomix.distributed import destroy_distributed
from tests.helpers.checkpoint_files import checkpoint_copy


def extract_concepts(argv):
    from tools import extract_concepts as tool

    return {"exit_code": tool.main(argv)}


def copy_checkpoint(root: str, iteration: int, new_root: str) -> dict:
    if torch.distributed.get_rank() == 0:
        checkpoint_copy(root, iteration, new_root)
    return {}


def expect_error(argv) -> dict:
    try:
        pretrain_cocomix.main(argv)
    except SystemExit as e:
        return {"exit_code": e.code}
    return {"exit_code": 0}


def main() -> None:
    spec_path, summary_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        runs = json.load(f)
    summaries = {}
    for name, kind, argv in runs:
        if kind == "extract":
            summaries[name] = extract_concepts(argv)
        elif kind == "copy":
            summaries[name] = copy_checkpoint(*argv)
        elif kind == "pretrain_error":
            summaries[name] = expect_error(argv)
        else:
            summaries[name] = pretrain_cocomix.main(argv)
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(summary_path, "w") as f:
            json.dump(summaries, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
