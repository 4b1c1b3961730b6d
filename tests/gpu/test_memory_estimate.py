"""The memory estimate of the start-up report (training/memory.py) against the GPU's measured peak, for the 386M
benchmark configurations of benchmarks/gpu_benchmark.sh (seq 1024, micro-batch 8, bf16): NTP (hidden 1072),
CoCoMix with online labels (GPT-2-124M-shaped random teacher, 32768-latent SAE) and with precomputed labels.

Two iterations each (the optimizer's states exist from the first step on, so the second holds everything a long
run holds); the log line of iteration 2 gives the peak allocated memory, which the estimate must be within 10% of.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers.gpu_runs import (
    BENCHMARK_386M,
    BENCHMARK_TEACHER,
    benchmark_common,
    benchmark_teacher,
    make_teacher,
    memory_numbers,
)
from tests.helpers.launch import run_pretrain, run_script
from tests.helpers.paths import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ITERATIONS = 2


@pytest.fixture(scope="module")
def benchmark_runs(quickstart, tmp_path_factory) -> dict:
    """{run: its stdout}. The three runs share the card at the same time (about 60 GB together; each process's
    peak is its own), the precomputed one after its labels are extracted."""
    tmp = tmp_path_factory.mktemp("memory_386m")
    assets = make_teacher(str(tmp / "assets"), BENCHMARK_TEACHER)
    common = benchmark_common(quickstart, ITERATIONS)
    labels = str(tmp / "labels")

    def train(name: str, argv: list) -> str:
        return run_pretrain(argv, tmp, name=name, timeout=600)["stdout"]

    def precomputed() -> str:
        run_script(os.path.join(ROOT, "tools", "extract_concepts.py"),
                   common + benchmark_teacher(assets) + ["--output-prefix", labels, "--no-progress"], timeout=600)
        return train("cocomix_precomputed", BENCHMARK_386M["cocomix"] + common + ["--concept-labels", labels])

    with ThreadPoolExecutor(3) as pool:
        runs = {"ntp": pool.submit(train, "ntp", BENCHMARK_386M["ntp"] + common),
                "cocomix_online": pool.submit(train, "cocomix_online",
                                              BENCHMARK_386M["cocomix"] + common + benchmark_teacher(assets)),
                "cocomix_precomputed": pool.submit(precomputed)}
        return {name: future.result() for name, future in runs.items()}


@pytest.mark.parametrize("run", ["ntp", "cocomix_online", "cocomix_precomputed"])
def test_estimate_within_10_percent_of_the_peak(run, benchmark_runs):
    numbers = memory_numbers(benchmark_runs[run])
    error = (numbers["estimate"] - numbers["allocated"]) / numbers["allocated"]
    print(f"\n{run}: estimate {numbers['estimate']:.0f} MB, peak allocated {numbers['allocated']:.0f} MB "
          f"(reserved {numbers['reserved']:.0f} MB): {100 * error:+.1f}%")
    assert abs(error) <= 0.10, numbers
