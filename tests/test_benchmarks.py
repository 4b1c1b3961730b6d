"""benchmarks/gpu_logs.py: the GPU benchmark's table, from log lines in the formats the runs print (the project's
Megatron log line and start-up report, the yardstick's result lines)."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest

from tests.helpers.paths import ROOT


def gpu_logs():
    spec = importlib.util.spec_from_file_location("gpu_logs", os.path.join(ROOT, "benchmarks", "gpu_logs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_log(flops: float, estimate: float, intervals, memory_key: str = "max allocated memory (MB)") -> str:
    """A pretrain_cocomix.py log at --log-interval 5: start-up report, then (ms, tokens/s, MFU, peak MB) per line."""
    lines = [" > model size and cost estimate:",
             f"   FLOPs per iteration: {flops:.4e} model, {flops:.4e} with recompute (2.4674e+09 per token; causal "
             "attention counted as half)",
             f"   memory estimate per device, stage 0 (MB): weights 736.0 | grads 1472.0 | optimizer 4416.0 | "
             f"activations 8459.0 | total {estimate:.1f} (megatron DDP; 1 micro-batches of activations in flight)"]
    for i, (ms, tokens, mfu, peak) in enumerate(intervals):
        lines.append(f" [2026-11-29 10:00:00.000000] iteration {5 * (i + 1):8d}/{5 * len(intervals):8d} | consumed "
                     f"samples: {40 * (i + 1):12d} | elapsed time per iteration (ms): {ms:.1f} | throughput per GPU "
                     f"(TFLOP/s/GPU): 201.5 | MFU (%): {mfu:.1f} | tokens per second: {tokens:.0f} | learning rate: "
                     "3.000000E-04 | global batch size:     8 | lm loss: 1.084824E+01 | loss scale: 1.0 | grad norm: "
                     f"15.620 | number of skipped iterations:   0 | number of nan iterations:   0 | {memory_key}: "
                     f"{peak:.1f} | max reserved memory (MB): 18420.0 |")
    return "\n".join(lines) + "\n"


def anchor_line(mode: str, size: str, ms: float, mfu: float, mem: float) -> str:
    tokens = 8 * 1024 / (ms / 1000)
    return (f"{mode:5s} {size:5s} mb=8 seq=1024 params={400.0:7.1f}M  {ms:8.1f} ms/step  {tokens:10.0f} tok/s  "
            f"student-MFU={mfu:5.1f}%  NTP-equiv-MFU={mfu:5.1f}%  mem={mem:.1f}GiB")


# The yardstick's output as it prints it on CPU (recorded, --sizes tiny --mb 2 --seq 64 --steps 2).
ANCHOR_TINY = """\
ntp   tiny  mb=2 seq=64 params=    3.4M     984.9 ms/step         130 tok/s  student-MFU=  0.0%  NTP-equiv-MFU=  0.0%  mem=0.0GiB
ref   tiny  mb=2 seq=64 params=    7.7M   11953.6 ms/step          11 tok/s  student-MFU=  0.0%  NTP-equiv-MFU=  0.0%  mem=0.0GiB
lean  tiny  mb=2 seq=64 params=    7.7M    7883.3 ms/step          16 tok/s  student-MFU=  0.0%  NTP-equiv-MFU=  0.0%  mem=0.0GiB
pre   tiny  mb=2 seq=64 params=    7.7M    1117.5 ms/step         115 tok/s  student-MFU=  0.0%  NTP-equiv-MFU=  0.0%  mem=0.0GiB
"""
ANCHOR_386M = "\n".join(["NVIDIA H200 2.11.0+cu130", "bf16 matmul 8192^3: 785 TFLOP/s",
                         anchor_line("ntp", "ntp386m", 80.0, 27.0, 15.5), anchor_line("ref", "386m", 310.0, 7.0, 30.0),
                         anchor_line("lean", "386m", 160.0, 13.5, 22.0), anchor_line("pre", "386m", 130.0, 16.6, 17.0)])
# (ms, tokens/s, MFU, peak MB) per logging interval; the first is the warm-up.
RUNS = {
    "ntp": (2.0213e13, 15083.0, [(254.7, 32163, 8.0, 16199.0), (100.0, 81920, 20.4, 16199.0),
                                 (104.0, 78769, 19.6, 16199.0), (98.0, 83592, 20.8, 16199.0)]),
    "cocomix_online": (3.9026e13, 21606.0, [(400.0, 20480, 9.6, 23652.0), (256.0, 32000, 15.3, 23652.0),
                                            (250.0, 32768, 15.6, 23652.0), (258.0, 31752, 15.1, 23652.0)]),
    "cocomix_online_bf16": (3.9026e13, 21606.0, [(300.0, 27307, 13.0, 22000.0), (200.0, 40960, 19.7, 22000.0),
                                                 (190.0, 43116, 20.8, 22000.0), (210.0, 39010, 18.8, 22000.0)]),
    "cocomix_precomputed": (3.0e13, 20000.0, [(200.0, 40960, 14.8, 20000.0), (120.0, 68267, 24.7, 20000.0),
                                              (125.0, 65536, 23.7, 20000.0), (130.0, 63015, 22.8, 20000.0)]),
}


@pytest.fixture
def logs(tmp_path):
    for name, (flops, estimate, intervals) in RUNS.items():
        (tmp_path / f"386m_{name}.log").write_text(project_log(flops, estimate, intervals))
    (tmp_path / "386m_anchor.log").write_text(ANCHOR_386M)
    return tmp_path


def test_project_run_is_the_median_after_the_warm_up_interval():
    flops, estimate, intervals = RUNS["ntp"]
    run = gpu_logs().project_run(project_log(flops, estimate, intervals))
    assert (run["first"], run["last"]) == (10, 20)
    assert (run["ms"], run["tokens"], run["mfu"]) == (100.0, 81920, 20.4)
    assert (run["memory"], run["estimate"], run["flops"]) == (16199.0, 15083.0, 2.0213e13)
    # On CPU the log line carries the peak resident set instead of the GPU's allocator.
    cpu = gpu_logs().project_run(project_log(flops, estimate, intervals, memory_key="max RSS (MB)"))
    assert cpu["memory"] == 16199.0
    assert gpu_logs().project_run(project_log(flops, estimate, intervals[:1])) is None


def test_yardstick_lines_are_filed_by_size():
    parsed = gpu_logs().anchor_runs(ANCHOR_386M + "\n" + ANCHOR_TINY)
    assert sorted(parsed) == ["386m", "tiny"] and sorted(parsed["386m"]) == ["lean", "ntp", "pre", "ref"]
    assert parsed["386m"]["ntp"]["ms"] == 80.0 and parsed["386m"]["ntp"]["memory"] == 15.5 * 1024
    assert parsed["tiny"]["ref"] == {"ms": 11953.6, "tokens": 11.0, "mfu": 0.0, "memory": 0.0, "mb": 2, "seq": 64}


def test_table_of_one_size(logs, capsys):
    assert gpu_logs().main(["table", "--runs", str(logs), "--size", "386m", "--anchor",
                            str(logs / "386m_anchor.log")]) == 0
    out = capsys.readouterr().out
    print(out)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    # NTP: 81.9k tokens/s against the yardstick's 102.4k (80 ms per 8192 tokens); its estimate 6.9% under the peak.
    assert rows["NTP (iterations 10-20)"] == ("| NTP (iterations 10-20) | 100.0 | 81.9k | 20.4 | 16199 | 15083 (-7%) | "
                                             "0.80x, 1.02x ntp | 1.00 | 1.00 |")
    assert "| 256.0 | 32.0k | 15.3 | 23652 | 21606 (-9%) | 1.21x, 0.77x ref | 2.56 | 1.93 |" in out
    assert "| 200.0 | 41.0k | 19.7 | 22000 | 21606 (-2%) | 0.80x, 0.98x lean | 2.00 | 1.93 |" in out
    assert "| 125.0 | 65.5k | 23.7 | 20000 | 20000 (+0%) | 1.04x, 1.15x pre | 1.25 | 1.48 |" in out
    assert "| yardstick lean: CoCoMix, bf16 teacher, sparse attribution | 160.0 | 51.2k | 13.5 | 22528 | | | 2.00 | |" in out
    assert "- NTP: 0.80x the yardstick's ntp (short of >= 1.0x)" in out
    assert "- CoCoMix precomputed labels: 1.04x the yardstick's pre (met >= 1.0x)" in out
    assert "- CoCoMix online, --teacher-dtype bf16 / NTP: step time 2.00x, FLOPs 1.93x (+4%: within 10%)" in out
    assert "- CoCoMix online, default teacher precision / NTP: step time 2.56x, FLOPs 1.93x (+33%: outside 10%)" in out
    assert out.startswith("yardstick: NVIDIA H200 2.11.0+cu130 | bf16 matmul 8192^3: 785 TFLOP/s")


def test_a_failed_run_and_a_missing_yardstick_are_named(logs, capsys):
    (logs / "386m_cocomix_precomputed.log").write_text("Traceback (most recent call last):\n...\n")
    missing = str(logs / "anchor_gpu_missing.log")
    assert gpu_logs().main(["table", "--runs", str(logs), "--size", "386m", "--anchor", missing]) == 0
    out = capsys.readouterr().out
    assert "| CoCoMix precomputed labels | failed (no logging interval after the first; see " \
           "386m_cocomix_precomputed.log) |" in out
    assert f"| yardstick pre: CoCoMix, precomputed labels | not run ({missing} missing) |" in out
    assert "x ntp" not in out and "| 1.00 | 1.00 |" in out  # no yardstick ratio, NTP ratios still there
    # Another size's yardstick lines are not this size's.
    (logs / "tiny_anchor.log").write_text(ANCHOR_TINY)
    gpu_logs().main(["table", "--runs", str(logs), "--size", "386m", "--anchor", str(logs / "tiny_anchor.log")])
    assert "no 386m lines in" in capsys.readouterr().out
    assert gpu_logs().main(["table", "--runs", str(logs / "nothing"), "--size", "386m"]) == 1


def test_cpu_runs_have_no_gpu_figures(tmp_path, capsys):
    """BENCH_SIZE=tiny on CPU: the peak resident set stands for the memory, and neither side has an MFU or a GPU
    memory to compare."""
    flops, estimate, intervals = RUNS["ntp"]
    cpu_line = [(ms, tokens, math.nan, peak) for ms, tokens, _, peak in intervals]
    (tmp_path / "tiny_ntp.log").write_text(project_log(flops, estimate, cpu_line, memory_key="max RSS (MB)")
                                           .replace(" MFU (%): nan |", ""))
    (tmp_path / "tiny_anchor.log").write_text(ANCHOR_TINY)
    gpu_logs().main(["table", "--runs", str(tmp_path), "--size", "tiny", "--anchor", str(tmp_path / "tiny_anchor.log")])
    out = capsys.readouterr().out
    # 8192 tokens in 100 ms against the yardstick's 130 tokens/s.
    assert "| NTP (iterations 10-20) | 100.0 | 81.9k | - | 16199 | 15083 (-7%) | 630.15x, - ntp | 1.00 | 1.00 |" in out
    assert "| yardstick ntp: NTP, SDPA, fused AdamW | 984.9 | 130 | 0.0 | 0 | | | 1.00 | |" in out
