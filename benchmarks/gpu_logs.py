"""Read pretrain_cocomix.py logs for benchmarks/gpu_run.sh.

    python benchmarks/gpu_logs.py ref LOG > benchmarks/gpu_tiny_ref_cpu.json    # per-iteration losses of a run
    python benchmarks/gpu_logs.py compare LOG REF [--tol 1e-3]                   # max |difference| against REF
    python benchmarks/gpu_logs.py summary LOG...                                 # throughput table of benchmark logs

`compare` prints per-iteration lm loss / concept loss / grad norm of LOG and REF and the max absolute difference
of each; it exits 1 when LOG has no iteration lines or a non-finite loss (a difference over --tol is reported,
not fatal: bf16 runs are compared too; the tolerance applies to the two losses). `summary` skips each log's first logging interval (warm-up) and reports
the median of the rest: ms per iteration, tokens/s, TFLOP/s/GPU, MFU, and the peak allocated / reserved memory
of the last line; the step-time ratio is against the log whose name contains 'ntp'.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys

KEYS = ("lm loss", "concept loss", "grad norm")
ITER = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|")


def _field(line: str, key: str):
    m = re.search(re.escape(key) + r": *([-+0-9.eEnaNif]+) *\|", line)
    return float(m.group(1)) if m else None


def iterations(path: str):
    rows = []
    with open(path, errors="replace") as f:
        for line in f:
            m = ITER.search(line)
            if not m or "elapsed time per iteration" not in line:
                continue
            row = {"iteration": int(m.group(1))}
            for key in KEYS + ("elapsed time per iteration (ms)", "tokens per second",
                               "throughput per GPU (TFLOP/s/GPU)", "MFU (%)",
                               "max allocated memory (MB)", "max reserved memory (MB)"):
                v = _field(line, key)
                if v is not None:
                    row[key] = v
            rows.append(row)
    return rows


def cmd_ref(log: str) -> int:
    rows = iterations(log)
    if not rows:
        print(f"error: no iteration lines in {log}", file=sys.stderr)
        return 1
    import platform

    import torch
    json.dump({"log": os.path.basename(log), "made_with": f"CPU {platform.machine()}, Python {platform.python_version()}, "
               f"torch {torch.__version__}, benchmarks/gpu_run.sh MODE=cpu-ref",
               "iterations": [{k: r[k] for k in ("iteration",) + KEYS if k in r} for r in rows]},
              sys.stdout, indent=1)
    print()
    return 0


def cmd_compare(log: str, ref: str, tol: float) -> int:
    rows = iterations(log)
    with open(ref) as f:
        want = {r["iteration"]: r for r in json.load(f)["iterations"]}
    if not rows:
        print(f"FAIL {os.path.basename(log)}: no iteration lines (see the log)")
        return 1
    worst = {k: 0.0 for k in KEYS}
    finite = True
    print(f"   {'iter':>4} " + " ".join(f"{k + ' (run / ref)':>30}" for k in KEYS))
    for r in rows:
        w = want.get(r["iteration"], {})
        cells = []
        for k in KEYS:
            a, b = r.get(k), w.get(k)
            if a is not None and not math.isfinite(a) and k != "grad norm":
                finite = False
            if a is not None and b is not None:
                worst[k] = max(worst[k], abs(a - b))
            cells.append(f"{a!s:>14} / {b!s:<13}")
        print(f"   {r['iteration']:>4} " + " ".join(cells))
    verdict = "finite" if finite else "NON-FINITE"
    within = all(worst[k] <= tol for k in ("lm loss", "concept loss"))
    print(f"   max |run - ref| {os.path.basename(log)}: " + ", ".join(f"{k} {v:.3e}" for k, v in worst.items())
          + f"; losses {verdict}; lm/concept loss {'within' if within else 'over'} {tol:g}")
    return 0 if finite else 1


def cmd_summary(logs) -> int:
    rows = []
    for log in logs:
        name = os.path.basename(log).rsplit(".", 1)[0]
        its = iterations(log) if os.path.exists(log) else []
        if len(its) < 2:
            rows.append((name, None))
            continue
        rest = its[1:]

        def med(k):
            vals = [r[k] for r in rest if k in r]
            return statistics.median(vals) if vals else float("nan")

        last = its[-1]
        rows.append((name, {"ms": med("elapsed time per iteration (ms)"), "tok": med("tokens per second"),
                            "tflops": med("throughput per GPU (TFLOP/s/GPU)"), "mfu": med("MFU (%)"),
                            "alloc": last.get("max allocated memory (MB)", float("nan")),
                            "resv": last.get("max reserved memory (MB)", float("nan")),
                            "iters": f"{rest[0]['iteration']}..{last['iteration']}"}))
    ntp = next((v for n, v in rows if "ntp" in n and v), None)
    print(f"{'run':<28} {'logged iters':>12} {'ms/iter':>8} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU %':>6} "
          f"{'max alloc MB':>12} {'max resv MB':>11} {'step/NTP':>8}")
    for name, v in rows:
        if v is None:
            print(f"{name:<28} FAILED (no iteration lines after warm-up; see its log)")
            continue
        ratio = v["ms"] / ntp["ms"] if ntp else float("nan")
        print(f"{name:<28} {v['iters']:>12} {v['ms']:>8.1f} {v['tok']:>9.0f} {v['tflops']:>8.1f} {v['mfu']:>6.1f} "
              f"{v['alloc']:>12.0f} {v['resv']:>11.0f} {ratio:>8.2f}")
    return 0


def main(argv) -> int:
    if len(argv) >= 2 and argv[0] == "ref":
        return cmd_ref(argv[1])
    if len(argv) >= 3 and argv[0] == "compare":
        tol = float(argv[argv.index("--tol") + 1]) if "--tol" in argv else 1e-3
        return cmd_compare(argv[1], argv[2], tol)
    if len(argv) >= 2 and argv[0] == "summary":
        return cmd_summary(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
