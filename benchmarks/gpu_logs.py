"""The table of benchmarks/gpu_run.sh: the project's benchmark runs beside the plain-PyTorch yardstick's, one size.

    python benchmarks/gpu_logs.py table --runs DIR --size 386m [--anchor LOG]

DIR holds benchmarks/gpu_benchmark.sh's logs, <size>_<run>.log for the runs of RUNS; LOG is the yardstick's output
at the same size, micro-batch and sequence length on the same card (its lines `<mode> <size> mb=.. seq=..
params=..M  <ms> ms/step  <n> tok/s  student-MFU=..%  NTP-equiv-MFU=..%  mem=..GiB`).

A project run's figures are the median over its logging intervals after the first (warm-up): ms per iteration,
tokens/s, MFU (training/flops.py's model FLOPs: the teacher's forward and partial backward included); peak memory
is the last log line's max allocated (the process's peak resident set on CPU), beside the start-up estimate. Each
project run is compared with its yardstick variant (RUNS) by tokens/s and peak memory, and with the project's NTP
by step time and by FLOPs per iteration. The yardstick's MFU counts its student's FLOPs only (no teacher), so the
two MFUs of a CoCoMix row are not comparable; tokens/s are (the same tokens per step).
"""

from __future__ import annotations

import math
import os
import re
import statistics
import sys
from typing import Dict, List, Optional

ITER = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|")
FIELDS = {"ms": "elapsed time per iteration (ms)", "tokens": "tokens per second", "mfu": "MFU (%)",
          "allocated": "max allocated memory (MB)", "rss": "max RSS (MB)"}
FLOPS = re.compile(r"FLOPs per iteration: ([0-9.eE+-]+) model")
ESTIMATE = re.compile(r"memory estimate per device, stage 0 \(MB\):.*\| total ([0-9.]+)")
ANCHOR = re.compile(r"^(?P<mode>ntp|ref|lean|pre)\s+(?P<size>\S+)\s+mb=(?P<mb>\d+) seq=(?P<seq>\d+) params=\s*"
                    r"(?P<params>[0-9.]+)M\s+(?P<ms>[0-9.]+) ms/step\s+(?P<tokens>[0-9.]+) tok/s\s+student-MFU=\s*"
                    r"(?P<mfu>[0-9.]+)%\s+NTP-equiv-MFU=\s*(?P<ntp_mfu>[0-9.]+)%\s+mem=(?P<mem>[0-9.]+)GiB")
# gpu_benchmark.sh's runs, in table order: (log name, label, the yardstick variant it is compared with).
RUNS = [("ntp", "NTP", "ntp"),
        ("cocomix_online", "CoCoMix online, default teacher precision", "ref"),
        ("cocomix_online_bf16", "CoCoMix online, --teacher-dtype bf16", "lean"),
        ("cocomix_precomputed", "CoCoMix precomputed labels", "pre")]
YARDSTICK = {"ntp": "NTP, SDPA, fused AdamW", "ref": "CoCoMix, the reference code's compute (fp32 teacher)",
             "lean": "CoCoMix, bf16 teacher, sparse attribution", "pre": "CoCoMix, precomputed labels"}
YARDSTICK_SIZE = {"tiny": "tiny", "69m": "69m", "386m": "386m", "1.38b": "1b"}


def _field(line: str, key: str) -> Optional[float]:
    m = re.search(re.escape(key) + r": *([-+0-9.eEnaNif]+) *\|", line)
    return float(m.group(1)) if m else None


def iterations(text: str) -> List[Dict[str, float]]:
    """The Megatron log lines of a run: {"iteration": n, field: value} for the fields of FIELDS it carries."""
    rows = []
    for line in text.splitlines():
        m = ITER.search(line)
        if not m or FIELDS["ms"] not in line:
            continue
        row = {"iteration": int(m.group(1))}
        for name, key in FIELDS.items():
            value = _field(line, key)
            if value is not None:
                row[name] = value
        rows.append(row)
    return rows


def project_run(text: str) -> Optional[Dict[str, float]]:
    """A project run's figures (module docstring), or None when it logged fewer than two intervals."""
    rows = iterations(text)
    if len(rows) < 2:
        return None
    rest = rows[1:]

    def median(name: str) -> float:
        values = [r[name] for r in rest if name in r]
        return statistics.median(values) if values else math.nan

    flops, estimate = FLOPS.search(text), ESTIMATE.search(text)
    last = rows[-1]
    return {"first": rest[0]["iteration"], "last": last["iteration"], "ms": median("ms"),
            "tokens": median("tokens"), "mfu": median("mfu"),
            "memory": last.get("allocated", last.get("rss", math.nan)),
            "estimate": float(estimate.group(1)) if estimate else math.nan,
            "flops": float(flops.group(1)) if flops else math.nan}


def anchor_runs(text: str) -> Dict[str, Dict[str, Dict[str, float]]]:
    """The yardstick's lines: {size: {mode: {ms, tokens, mfu, memory (MB), mb, seq}}}; NTP's size is printed with
    an 'ntp' prefix (its wider, parameter-matched model), filed under the plain size."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for line in text.splitlines():
        m = ANCHOR.match(line.strip())
        if not m:
            continue
        size = m["size"][3:] if m["mode"] == "ntp" and m["size"].startswith("ntp") else m["size"]
        out.setdefault(size, {})[m["mode"]] = {"ms": float(m["ms"]), "tokens": float(m["tokens"]),
                                               "mfu": float(m["mfu"]), "memory": float(m["mem"]) * 1024.0,
                                               "mb": int(m["mb"]), "seq": int(m["seq"])}
    return out


def _num(value: float, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def _tokens(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value / 1000:.1f}k" if value >= 10000 else f"{value:.0f}"


def table(runs: Dict[str, Optional[Dict[str, float]]], anchor: Dict[str, Dict[str, float]],
          size: str, anchor_note: Optional[str] = None) -> str:
    """The markdown table of one size: the project's runs (by RUNS name; None = failed), then the yardstick's."""
    ntp = runs.get("ntp")
    lines = [f"Size {size}.", "",
             "| run | ms/iter | tokens/s | MFU % | peak memory MB | estimate MB | vs yardstick: tokens/s, memory | "
             "step / NTP | FLOPs / NTP |", "|---|---|---|---|---|---|---|---|---|"]
    for name, label, variant in RUNS:
        if name not in runs:
            continue
        v = runs[name]
        if v is None:
            lines.append(f"| {label} | failed (no logging interval after the first; see {size}_{name}.log) "
                         "| | | | | | | |")
            continue
        estimate = _num(v["estimate"], ".0f")
        if math.isfinite(v["estimate"]) and math.isfinite(v["memory"]) and v["memory"] > 0:
            estimate += f" ({100 * (v['estimate'] - v['memory']) / v['memory']:+.0f}%)"
        yard = anchor.get(variant)
        versus = "-"
        if yard:
            memory = v["memory"] / yard["memory"] if yard["memory"] > 0 else math.nan
            versus = f"{v['tokens'] / yard['tokens']:.2f}x, {_num(memory, '.2f')}{'x' * math.isfinite(memory)} {variant}"
        iterations = f"{v['first']}-{v['last']}" if v["last"] > v["first"] else f"{v['first']}"
        step = v["ms"] / ntp["ms"] if ntp else math.nan
        flops = v["flops"] / ntp["flops"] if ntp else math.nan
        lines.append(f"| {label} (iterations {iterations}) | {_num(v['ms'], '.1f')} | "
                     f"{_tokens(v['tokens'])} | {_num(v['mfu'], '.1f')} | {_num(v['memory'], '.0f')} | {estimate} | "
                     f"{versus} | {_num(step, '.2f')} | {_num(flops, '.2f')} |")
    yard_ntp = anchor.get("ntp")
    for mode, label in YARDSTICK.items():
        y = anchor.get(mode)
        if y is None:
            lines.append(f"| yardstick {mode}: {label} | {anchor_note or 'not run'} | | | | | | | |")
            continue
        step = _num(y["ms"] / yard_ntp["ms"], ".2f") if yard_ntp else "-"
        lines.append(f"| yardstick {mode}: {label} | {y['ms']:.1f} | {_tokens(y['tokens'])} | {y['mfu']:.1f} | "
                     f"{y['memory']:.0f} | | | {step} | |")
    lines += ["", *_verdicts(runs, anchor)]
    return "\n".join(lines)


def _verdicts(runs: Dict[str, Optional[Dict[str, float]]], anchor: Dict[str, Dict[str, float]]) -> List[str]:
    """The targets: each project run at least as fast as its yardstick variant; the online CoCoMix / NTP step
    time within 10% of the FLOP ratio."""
    out = []
    for name, label, variant in RUNS:
        v, y = runs.get(name), anchor.get(variant)
        if v and y and variant != "ref":
            ratio = v["tokens"] / y["tokens"]
            out.append(f"- {label}: {ratio:.2f}x the yardstick's {variant} ({'met' if ratio >= 1.0 else 'short of'} "
                       f">= 1.0x)")
    ntp = runs.get("ntp")
    for name in ("cocomix_online", "cocomix_online_bf16"):
        v = runs.get(name)
        if ntp and v and math.isfinite(v["flops"]) and math.isfinite(ntp["flops"]):
            step, flops = v["ms"] / ntp["ms"], v["flops"] / ntp["flops"]
            over = step / flops - 1.0
            out.append(f"- {dict((n, lab) for n, lab, _ in RUNS)[name]} / NTP: step time {step:.2f}x, FLOPs "
                       f"{flops:.2f}x ({100 * over:+.0f}%: {'within' if abs(over) <= 0.10 else 'outside'} 10%)")
    return out


def _read(path: str) -> Optional[str]:
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        return f.read()


def cmd_table(runs_dir: str, size: str, anchor_log: Optional[str]) -> int:
    runs = {}
    for name, _, _ in RUNS:
        text = _read(os.path.join(runs_dir, f"{size}_{name}.log"))
        runs[name] = project_run(text) if text is not None else None
    anchor, note = {}, None
    text = _read(anchor_log) if anchor_log else None
    if text is None:
        note = f"not run ({anchor_log} missing)" if anchor_log else "not run"
    else:
        anchor = anchor_runs(text).get(YARDSTICK_SIZE.get(size, size), {})
        note = None if anchor else f"no {YARDSTICK_SIZE.get(size, size)} lines in {anchor_log}"
        header = [line for line in text.splitlines()[:3] if "TFLOP/s" in line or "+cu" in line]
        if header:
            print("yardstick: " + " | ".join(header))
    print(table(runs, anchor, size, note))
    return 0 if any(runs.values()) else 1


def main(argv: List[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("table", help="The table of one size.")
    make.add_argument("--runs", required=True, help="gpu_benchmark.sh's log folder (<size>_<run>.log).")
    make.add_argument("--size", required=True, help="69m, 386m, 1.38b or tiny.")
    make.add_argument("--anchor", default=None, help="The yardstick's output at this size.")
    options = parser.parse_args(argv)
    return cmd_table(options.runs, options.size, options.anchor)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
