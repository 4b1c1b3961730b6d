#!/usr/bin/env bash
# One GPU sitting in one command (the card session: benchmarks/gpu.md; results: benchmarks/gpu_h200.md):
#   1. the machine: nvidia-smi, versions of Python, torch, megatron-core, DeepSpeed, transformers, pytest;
#   2. the tests that need the card: python -m pytest tests -m "${TESTS}" (default gpu: tests/gpu/ and
#      tests/model/test_attention_kernels.py);
#   3. for each size of SIZES: benchmarks/gpu_benchmark.sh (NTP, CoCoMix online with the default teacher
#      precision and with --teacher-dtype bf16, CoCoMix precomputed), then the plain-PyTorch yardstick ANCHOR's
#      four variants (ntp, ref, lean, pre) at the same size, micro-batch and sequence length on the same card;
#   4. one table per size (benchmarks/gpu_logs.py table): tokens/s, MFU, peak memory and its estimate, each run
#      against its yardstick variant, step time and FLOPs against NTP. Printed last, and kept in OUT/summary.md.
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh        # on the GPU machine, about 7 minutes at SIZES=386m
#   BENCH_SIZE=tiny bash benchmarks/gpu_run.sh       # the whole script tiny on CPU (checks it; 15 min on 2 busy cores)
# SIZES: "386m" (default); "69m 386m 1.38b" adds about 2 + 4 minutes. ITERS: project iterations per run (20;
# the table takes the median of the logging intervals after the first). STEPS: the yardstick's timed steps (20).
# ANCHOR: the yardstick script, which is not part of the repository (default benchmarks/results/anchor_gpu.py:
# benchmarks/results/ is git-ignored, so a copy there goes with the working tree); without it the table has the
# project's rows only. TESTS: a pytest marker expression ("" skips the tests). OUT keeps the logs and the table;
# the runs' assets and labels go to BENCH_DIR (default /tmp/gpu_bench).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/gpu_run}"
BENCH_DIR="${BENCH_DIR:-/tmp/gpu_bench}"
ANCHOR="${ANCHOR:-benchmarks/results/anchor_gpu.py}"
TESTS="${TESTS-gpu}"
if [ "${BENCH_SIZE:-}" = tiny ]; then
    SIZES=tiny; ITERS="${ITERS:-10}"; STEPS="${STEPS:-1}"
else
    SIZES="${SIZES:-${BENCH_SIZE:-386m}}"; ITERS="${ITERS:-20}"; STEPS="${STEPS:-20}"
fi
mkdir -p "${OUT}" "${BENCH_DIR}"
start=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - start )) s)"; }

stage "1. machine"
command -v nvidia-smi >/dev/null && nvidia-smi
PYTHONWARNINGS=ignore "${PYTHON}" - 2>&1 <<'EOF' | grep -v "WARNING\|warnings.warn"
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for m in ("megatron.core", "deepspeed", "transformers", "safetensors", "tokenizers", "pydantic", "pytest"):
    try:
        mod = __import__(m, fromlist=["x"])
        print(f"  {m} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"  {m}: import failed: {type(e).__name__}: {e}")
EOF
if [ "${SIZES}" != tiny ] && ! "${PYTHON}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to torch; stopping (BENCH_SIZE=tiny runs the script on CPU)"; exit 1
fi
bash examples/prepare_quickstart_data.sh || exit 1

stage "2. tests: python -m pytest tests -m '${TESTS}'"
TEST_RESULT="not run (TESTS is empty)"
if [ -n "${TESTS}" ]; then
    if "${PYTHON}" -c "import pytest" 2>/dev/null; then
        "${PYTHON}" -m pytest tests -m "${TESTS}" -q -rfEs > "${OUT}/tests.log" 2>&1
        tail -n 40 "${OUT}/tests.log"
        TEST_RESULT="$(tail -n 1 "${OUT}/tests.log")"
    else
        TEST_RESULT="not run: pytest is not installed (bring its wheels: pytest, pluggy, iniconfig)"
        echo "${TEST_RESULT}"
    fi
fi

for size in ${SIZES}; do
    stage "3. ${size}: benchmarks/gpu_benchmark.sh, ITERS=${ITERS}"
    rm -f "${BENCH_DIR}/${size}"_*.log  # a run that does not happen this time must not show an old log
    SIZE="${size}" ITERS="${ITERS}" OUT="${BENCH_DIR}" PYTHON="${PYTHON}" bash benchmarks/gpu_benchmark.sh \
        | tee "${BENCH_DIR}/${size}_benchmark.out"
    stage "3. ${size}: the yardstick (${ANCHOR}), STEPS=${STEPS}"
    if [ -f "${ANCHOR}" ]; then
        read -r seq mbs < <(sed -n 's/^size .*: seq \([0-9]*\), micro-batch \([0-9]*\)$/\1 \2/p' "${BENCH_DIR}/${size}_benchmark.out")
        yardstick_size="$(case "${size}" in 1.38b) echo 1b ;; *) echo "${size}" ;; esac)"
        "${PYTHON}" "${ANCHOR}" --sizes "${yardstick_size}" --modes ntp,ref,lean,pre --mb "${mbs:-8}" \
            --seq "${seq:-1024}" --steps "${STEPS}" 2>&1 | tee "${BENCH_DIR}/${size}_anchor.log" | grep -v -i warn
    else
        echo "yardstick missing: ${ANCHOR} does not exist. Copy anchor_gpu.py there (benchmarks/results/ is"
        echo "git-ignored and travels with the working tree) or set ANCHOR=<path>; the table has the project's rows only."
    fi
done

stage "4. summary ($(date -u +%Y-%m-%dT%H:%MZ), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo CPU))"
cp "${BENCH_DIR}"/*.log "${BENCH_DIR}"/*.out "${OUT}/" 2>/dev/null
{
    echo "tests: ${TEST_RESULT}"
    for size in ${SIZES}; do
        echo
        anchor=(); [ -s "${BENCH_DIR}/${size}_anchor.log" ] && anchor=(--anchor "${BENCH_DIR}/${size}_anchor.log")
        "${PYTHON}" benchmarks/gpu_logs.py table --runs "${BENCH_DIR}" --size "${size}" "${anchor[@]}"
    done
    echo
    echo "wall time: $(( $(date +%s) - start )) s"
} | tee "${OUT}/summary.md"
