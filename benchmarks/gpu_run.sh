#!/usr/bin/env bash
# One sitting on a GPU machine (results: benchmarks/gpu_h200.md):
#   1. nvidia-smi and the versions of Python, torch, megatron-core, DeepSpeed, transformers;
#   2. CUDA correctness: a tiny CoCoMix student (4 layers x 128, seq 128, micro-batch 4, online labels from a
#      3-layer x 64 random GPT-2 teacher + 512-latent TopK SAE made by tools/make_tiny_teacher.py) trained 5
#      iterations in fp32 with dropout 0 and tf32 off (NVIDIA_TF32_OVERRIDE=0), its per-iteration lm loss,
#      concept loss and grad norm compared with the CPU reference benchmarks/gpu_tiny_ref_cpu.json; then the same
#      run in --bf16 (must run and give finite losses close to the reference);
#   3. benchmarks/gpu_benchmark.sh at SIZE=386m (NTP, CoCoMix online labels, CoCoMix precomputed labels).
# Logs go to $OUT as two tarballs plus summary.txt; the summary table is printed last.
#
#   OUT=/some/dir ITERS=30 bash benchmarks/gpu_run.sh       # on the GPU machine (megatron-core, DeepSpeed importable)
#   MODE=cpu-ref bash benchmarks/gpu_run.sh                 # here: rewrites benchmarks/gpu_tiny_ref_cpu.json
# The tiny assets are read from TINY_ASSETS (default benchmarks/results/gpu_tiny_assets, built with seed 0 when
# absent); bring the copy the reference was made with, so both sides train on identical teacher and SAE weights.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
MODE="${MODE:-gpu}"
OUT="${OUT:-benchmarks/results/gpu_run}"
ITERS="${ITERS:-30}"
BENCH_SIZE="${BENCH_SIZE:-386m}"   # tiny: checks this script on CPU
ASSETS="${TINY_ASSETS:-benchmarks/results/gpu_tiny_assets}"
REF=benchmarks/gpu_tiny_ref_cpu.json
LOGS="$(mktemp -d /tmp/gpu_run.XXXXXX)"
mkdir -p "${OUT}"
TEACHER_ARGS=(--layers 3 --hidden 64 --heads 4 --positions 128 --num-latents 512 --sae-k 8 --seed 0)

bash examples/prepare_quickstart_data.sh
[ -s "${ASSETS}/teacher/model.safetensors" ] || "${PYTHON}" tools/make_tiny_teacher.py --output-dir "${ASSETS}" "${TEACHER_ARGS[@]}"

TINY=(
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128
    --attention-dropout 0 --hidden-dropout 0
    --cocomix --concept-layer 2 --concept-topk 8 --teacher-model "${ASSETS}/teacher" --teacher-layer 2 --sae "${ASSETS}/sae"
    --data-path data_cache/shakespeare_text_document --tokenizer-type GPT2BPETokenizer
    --vocab-file examples/data/gpt2/encoder.json --merge-file examples/data/gpt2/vocab.bpe --num-workers 1
    --micro-batch-size 4 --global-batch-size 4 --train-iters 5 --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine
    --lr-warmup-iters 1 --weight-decay 0.1 --clip-grad 1.0 --seed 1234 --log-interval 1 --eval-iters 0
)

if [ "${MODE}" = cpu-ref ]; then
    CUDA_VISIBLE_DEVICES= "${PYTHON}" pretrain_cocomix.py "${TINY[@]}" > "${LOGS}/tiny_cpu_fp32.log" 2>&1 \
        || { tail -20 "${LOGS}/tiny_cpu_fp32.log"; exit 1; }
    "${PYTHON}" benchmarks/gpu_logs.py ref "${LOGS}/tiny_cpu_fp32.log" > "${REF}" && cat "${REF}"
    sha256sum "${ASSETS}"/teacher/model.safetensors "${ASSETS}"/sae/*.safetensors
    exit 0
fi

echo "=== 1. machine"
nvidia-smi
PYTHONWARNINGS=ignore "${PYTHON}" - 2>&1 <<'EOF' | grep -v "WARNING\|warnings.warn"
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("tf32 matmul allowed by default:", torch.backends.cuda.matmul.allow_tf32)
for m in ("megatron.core", "deepspeed", "transformers", "safetensors", "tokenizers", "pydantic"):
    try:
        mod = __import__(m, fromlist=["x"])
        print(f"  {m} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"  {m}: import failed: {type(e).__name__}: {e}")
EOF
if [ "${BENCH_SIZE}" != tiny ] && ! "${PYTHON}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to torch; stopping (BENCH_SIZE=tiny runs the script on CPU)"; exit 1
fi


echo "=== 2. tiny CoCoMix, CUDA vs CPU reference (${REF})"
sha256sum "${ASSETS}"/teacher/model.safetensors "${ASSETS}"/sae/*.safetensors | tee "${LOGS}/assets_sha256.txt"
# Also: does make_tiny_teacher.py rebuild the same weights with this machine's torch/transformers?
"${PYTHON}" tools/make_tiny_teacher.py --output-dir "${LOGS}/fresh_assets" "${TEACHER_ARGS[@]}" > /dev/null 2>&1 \
    && "${PYTHON}" - "${ASSETS}" "${LOGS}/fresh_assets" <<'EOF'
import sys, glob, os
from safetensors.torch import load_file
for sub in ("teacher", "sae"):
    a = {}; b = {}
    for f in glob.glob(os.path.join(sys.argv[1], sub, "*.safetensors")): a.update(load_file(f))
    for f in glob.glob(os.path.join(sys.argv[2], sub, "*.safetensors")): b.update(load_file(f))
    diff = max(((a[k].float() - b[k].float()).abs().max().item() for k in a if k in b), default=float("nan"))
    print(f"   make_tiny_teacher.py rebuilt here vs reference assets, {sub}: {len(a)} / {len(b)} tensors, max |diff| {diff:.3e}")
EOF
NVIDIA_TF32_OVERRIDE=0 "${PYTHON}" pretrain_cocomix.py "${TINY[@]}" > "${LOGS}/tiny_cuda_fp32.log" 2>&1 \
    || { echo "tiny CUDA fp32 run FAILED:"; grep -v -i warn "${LOGS}/tiny_cuda_fp32.log" | tail -25; }
"${PYTHON}" benchmarks/gpu_logs.py compare "${LOGS}/tiny_cuda_fp32.log" "${REF}" --tol 1e-3 | tee "${LOGS}/tiny_compare.txt"
"${PYTHON}" pretrain_cocomix.py "${TINY[@]}" --bf16 > "${LOGS}/tiny_cuda_bf16.log" 2>&1 \
    || { echo "tiny CUDA bf16 run FAILED:"; grep -v -i warn "${LOGS}/tiny_cuda_bf16.log" | tail -25; }
"${PYTHON}" benchmarks/gpu_logs.py compare "${LOGS}/tiny_cuda_bf16.log" "${REF}" --tol 5e-2 | tee -a "${LOGS}/tiny_compare.txt"
grep -h "memory (MB)" "${LOGS}"/tiny_cuda_*.log | tail -2
tar -czf "${OUT}/tiny_logs.tar.gz" -C "${LOGS}" --exclude fresh_assets .

echo "=== 3. gpu_benchmark.sh SIZE=${BENCH_SIZE}, ITERS=${ITERS}"
BENCH=/tmp/gpu_bench
start=$(date +%s)
SIZE="${BENCH_SIZE}" ITERS="${ITERS}" OUT="${BENCH}" PYTHON="${PYTHON}" bash benchmarks/gpu_benchmark.sh 2>&1 | tee "${LOGS}/benchmark.out"
echo "benchmark wall time: $(( $(date +%s) - start )) s"
for f in "${BENCH}"/${BENCH_SIZE}_*.log; do grep -v -i "warn" "${f}" | grep -E "error|Error|Traceback" | head -5; done
tar -czf "${OUT}/bench_logs.tar.gz" -C "${BENCH}" --exclude "assets_*" --exclude "*.bin" --exclude "*.idx" .

echo "=== summary ($(date -u +%Y-%m-%dT%H:%MZ), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
{
    grep "max |run - ref|" "${LOGS}/tiny_compare.txt"
    grep -H "FLOPs per iteration\|memory estimate" "${BENCH}"/${BENCH_SIZE}_*.log
    "${PYTHON}" benchmarks/gpu_logs.py summary "${BENCH}"/${BENCH_SIZE}_ntp.log "${BENCH}"/${BENCH_SIZE}_cocomix_online.log \
        "${BENCH}"/${BENCH_SIZE}_cocomix_precomputed.log
} | tee "${OUT}/summary.txt"
