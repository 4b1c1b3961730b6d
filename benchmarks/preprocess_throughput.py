"""Preprocessing throughput: tokens/s (total and per worker) of tools/preprocess_data.py on the shipped corpus.

    python benchmarks/preprocess_throughput.py --workers 1 2 --repeat 4

The corpus (examples/data/shakespeare.jsonl.gz, 781 documents, ~1.5 M GPT-2 tokens) is written `--repeat` times
into one .jsonl file so the run is long enough to amortise the worker start-up. Each worker count runs the
tool in-process with the GPT-2 tokenizer and --append-eod; the time covers reading, tokenizing and writing the
.bin/.idx (not the ~4 s of Python imports). tokens/CPU-s divides by the CPU time of the tool and its workers,
a figure that holds on a busy machine where wall-clock rates do not. All runs must give byte-identical outputs,
which is checked.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import os
import resource
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_seconds() -> float:
    # This process plus its reaped children (the tokenizer workers): CPU time does not depend on machine load.
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=4, help="Copies of the corpus in the benchmark input.")
    args = parser.parse_args()

    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(ROOT, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    spec.loader.exec_module(tool)

    tmp = tempfile.mkdtemp(prefix="preprocess_bench_")
    try:
        corpus = os.path.join(tmp, "corpus.jsonl")
        with gzip.open(os.path.join(ROOT, "examples", "data", "shakespeare.jsonl.gz"), "rb") as f:
            data = f.read()
        with open(corpus, "wb") as f:
            for _ in range(args.repeat):
                f.write(data)
        gpt2 = os.path.join(ROOT, "examples", "data", "gpt2")
        digests = set()
        print(f"input: {os.path.getsize(corpus) / 1e6:.1f} MB of jsonl ({args.repeat} x shakespeare), "
              f"GPT2BPETokenizer, {os.cpu_count()} CPU cores")
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        print(f"{'workers':>7} {'tokens':>10} {'seconds':>8} {'tokens/s':>10} {'tokens/s/worker':>16} {'MB/s':>6} "
              f"{'tokens/CPU-s':>12}")
        for workers in args.workers:
            prefix = os.path.join(tmp, f"out_w{workers}")
            namespace = tool.build_parser().parse_args([
                "--input", corpus, "--output-prefix", prefix, "--tokenizer-type", "GPT2BPETokenizer",
                "--vocab-file", os.path.join(gpt2, "encoder.json"), "--merge-file", os.path.join(gpt2, "vocab.bpe"),
                "--append-eod", "--workers", str(workers), "--quiet"])
            cpu_before = _cpu_seconds()
            start = time.perf_counter()
            stats = tool.run(namespace)
            seconds = time.perf_counter() - start
            cpu = _cpu_seconds() - cpu_before
            tokens = stats.tokens["text"]
            with open(prefix + "_text_document.bin", "rb") as f:
                digests.add(hashlib.sha256(f.read()).hexdigest())
            print(f"{workers:>7} {tokens:>10} {seconds:>8.2f} {tokens / seconds:>10.0f} "
                  f"{tokens / seconds / workers:>16.0f} {os.path.getsize(corpus) / seconds / 1e6:>6.2f} {tokens / cpu:>12.0f}")
        if len(digests) != 1:
            print("error: outputs differ between worker counts", file=sys.stderr)
            return 1
        print("outputs byte-identical across worker counts")
    finally:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
