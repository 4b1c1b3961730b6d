"""Several training runs (and label extractions) one after the other in one launch, to save start-up time.

Usage: <launcher> tests/distributed/cocomix_runs.py SPEC_JSON SUMMARY_JSON
SPEC_JSON is a list of [name, kind, argv] with kind "pretrain" (pretrain_cocomix.main) or "extract"
(tools/extract_concepts.py). The process group stays up across runs; megatron's model-parallel state and the
cached online teacher are rebuilt for each run, so each run starts as a fresh launch would (seeds are reset by
initialize_distributed). The last rank (which holds the losses on every layout) writes {name: summary}.
"""

import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

import pretrain_cocomix  # noqa: E402
from megatron_cocomix.distributed import destroy_distributed  # noqa: E402


def extract_concepts(argv):
    spec = importlib.util.spec_from_file_location("extract_concepts", os.path.join(ROOT, "tools",
                                                                                    "extract_concepts.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return {"exit_code": tool.main(argv)}


def main() -> None:
    spec_path, summary_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        runs = json.load(f)
    summaries = {}
    for name, kind, argv in runs:
        if kind == "extract":
            summaries[name] = extract_concepts(argv)
        else:
            summaries[name] = pretrain_cocomix.main(argv)
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        pretrain_cocomix._TEACHER = None
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(summary_path, "w") as f:
            json.dump(summaries, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
