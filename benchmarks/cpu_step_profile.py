"""Host waits and aten ops per training step, counted on CPU (results: benchmarks/cpu_step_profile.md).

On a GPU each host wait stalls the kernel queue, and each aten op is at least one kernel launch (a few
microseconds of host time). This counts both for one training step (iteration 3 of 4, so one-off work is done)
of tiny NTP, CoCoMix (online and precomputed labels) and KD runs, in one process, with
megatron_cocomix/training/host_syncs.py. `--repo` runs another checkout's code (an older commit, to compare)
with this checkout's counter.

    python benchmarks/cpu_step_profile.py                       # this checkout
    python benchmarks/cpu_step_profile.py --repo /tmp/old       # another checkout, same counter
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
COUNTER = os.path.join(HERE, "..", "megatron_cocomix", "training", "host_syncs.py")

TINY = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--max-position-embeddings", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "4", "--lr", "1e-3", "--lr-warmup-iters", "1", "--clip-grad", "1.0",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "100", "--eval-iters", "0",
        "--num-workers", "0", "--seed", "1234", "--bf16",
        "--data-path", "data_cache/shakespeare_text_document", "--tokenizer-type", "GPT2BPETokenizer",
        "--vocab-file", "examples/data/gpt2/encoder.json", "--merge-file", "examples/data/gpt2/vocab.bpe"]


def _load_counter():
    spec = importlib.util.spec_from_file_location("host_syncs_counter", COUNTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HostSyncCounter


def profile(name: str, argv: list, counter_cls) -> dict:
    from megatron.core import parallel_state

    import pretrain_cocomix
    from megatron_cocomix.training import loop

    counters, original = [], loop.train_step

    def counted(*args, **kwargs):
        counter = counter_cls()
        counters.append(counter)
        with counter:
            return original(*args, **kwargs)

    loop.train_step = counted
    try:
        pretrain_cocomix.main(argv)
    finally:
        loop.train_step = original
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    step = counters[2]
    return {"name": name, "syncs": step.count, "ops": sum(step.ops.values()), "sites": step.report(),
            "top_ops": step.ops.most_common(8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=os.path.dirname(HERE), help="checkout whose code runs (default: this one)")
    parser.add_argument("--runs", default="ntp,cocomix_online,cocomix_precomputed,kd")
    args = parser.parse_args()
    repo = os.path.abspath(args.repo)
    counter_cls = _load_counter()
    os.chdir(repo)
    sys.path.insert(0, repo)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    import megatron_cocomix  # noqa: F401
    from megatron_cocomix import compat

    compat.install()
    work = tempfile.mkdtemp(prefix="step_profile_")
    assets = os.path.join(work, "assets")
    from tools import make_tiny_teacher

    make_tiny_teacher.main(["--output-dir", assets, "--layers", "3", "--hidden", "64", "--heads", "4",
                            "--positions", "128", "--num-latents", "512", "--sae-k", "8", "--seed", "0"])
    concepts = ["--cocomix", "--concept-layer", "2", "--concept-topk", "8"]
    teacher = ["--teacher-model", os.path.join(assets, "teacher")]
    online = concepts + teacher + ["--teacher-layer", "2", "--sae", os.path.join(assets, "sae")]
    labels = os.path.join(work, "labels")
    runs = {"ntp": TINY, "cocomix_online": TINY + online,
            "cocomix_precomputed": TINY + concepts + ["--concept-labels", labels], "kd": TINY + ["--kd"] + teacher
            + ["--teacher-layer", "2"]}
    results = []
    for name in args.runs.split(","):
        if name == "cocomix_precomputed" and not os.path.exists(labels + ".idx"):
            from tools import extract_concepts

            extract_concepts.main(TINY + online + ["--output-prefix", labels])
        results.append(profile(name, runs[name], counter_cls))
    print(f"\nrepo: {repo}")
    print("| run | host waits per step | aten ops per step | most frequent ops |")
    print("|---|---:|---:|---|")
    for r in results:
        top = ", ".join(f"{op} {n}" for op, n in r["top_ops"][:5])
        print(f"| {r['name']} | {r['syncs']} | {r['ops']} | {top} |")
    for r in results:
        if r["syncs"]:
            print(f"\n{r['name']}: where the host waits\n{r['sites']}")


if __name__ == "__main__":
    main()
