#!/usr/bin/env bash
# Throughput of the 386M configuration on one GPU: NTP (hidden 1072, param-matched), CoCoMix with online labels
# (GPT-2-124M-shaped random teacher + 32768-latent random SAE: speed does not depend on the weights) and CoCoMix
# with precomputed labels; seq 1024, bf16, 20 iterations each. The log line of each run gives tokens/s, TFLOP/s
# and MFU; the start-up report gives the memory estimate, the last log line the measured memory.
#
#   bash benchmarks/gpu_benchmark.sh                 # on a GPU machine (writes benchmarks/results/*.log)
#   SIZE=tiny bash benchmarks/gpu_benchmark.sh       # the same runs, tiny, on CPU: checks the script itself
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
SIZE="${SIZE:-386m}"
OUT="${OUT:-benchmarks/results}"
ITERS="${ITERS:-20}"
mkdir -p "${OUT}"
bash examples/prepare_quickstart_data.sh >/dev/null

if [ "${SIZE}" = 386m ]; then
    COCOMIX_MODEL=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --concept-layer 5)
    NTP_MODEL=(--num-layers 24 --hidden-size 1072 --num-attention-heads 16)
    SEQ=1024; MBS=8; PRECISION=(--bf16)
    TEACHER=(--layers 12 --hidden 768 --heads 12 --positions 1024 --num-latents 32768 --sae-k 32)
    TOPK=32; TEACHER_LAYER=6
else
    COCOMIX_MODEL=(--num-layers 4 --hidden-size 64 --num-attention-heads 4 --concept-layer 2)
    NTP_MODEL=(--num-layers 4 --hidden-size 72 --num-attention-heads 4)
    SEQ=64; MBS=2; PRECISION=()
    TEACHER=(--layers 3 --hidden 64 --heads 4 --positions 128 --num-latents 512 --sae-k 8)
    TOPK=8; TEACHER_LAYER=2
fi
ASSETS="${OUT}/assets_${SIZE}"
"${PYTHON}" tools/make_tiny_teacher.py --output-dir "${ASSETS}" "${TEACHER[@]}" --seed 0

COMMON=(
    --seq-length "${SEQ}" --max-position-embeddings "${SEQ}" --micro-batch-size "${MBS}" --global-batch-size "${MBS}"
    --train-iters "${ITERS}" --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 "${PRECISION[@]}"
    --attention-dropout 0 --hidden-dropout 0
    --data-path data_cache/shakespeare_text_document --tokenizer-type GPT2BPETokenizer
    --vocab-file examples/data/gpt2/encoder.json --merge-file examples/data/gpt2/vocab.bpe
    --log-interval 5 --eval-iters 0 --num-workers 2
)
CONCEPTS=(--cocomix --concept-topk "${TOPK}" --teacher-model "${ASSETS}/teacher" --teacher-layer "${TEACHER_LAYER}"
          --sae "${ASSETS}/sae")

run() { local name=$1; shift; echo "== ${name}"; "${PYTHON}" pretrain_cocomix.py "$@" 2>&1 | tee "${OUT}/${SIZE}_${name}.log" \
    | grep -E "iteration +${ITERS}/|memory \(MB\)|FLOPs per iteration|memory estimate" || true; }

run ntp "${NTP_MODEL[@]}" "${COMMON[@]}"
run cocomix_online "${COCOMIX_MODEL[@]}" "${COMMON[@]}" "${CONCEPTS[@]}"
# Precomputed labels for exactly these training samples, then the same student without a teacher in the step.
"${PYTHON}" tools/extract_concepts.py "${COMMON[@]}" --teacher-model "${ASSETS}/teacher" \
    --teacher-layer "${TEACHER_LAYER}" --sae "${ASSETS}/sae" --output-prefix "${OUT}/labels_${SIZE}" 2>&1 \
    | tee "${OUT}/${SIZE}_extract.log" | tail -1 \
    || { echo "extract_concepts.py failed:"; grep -v -i warn "${OUT}/${SIZE}_extract.log" | tail -5; exit 1; }
run cocomix_precomputed "${COCOMIX_MODEL[@]}" "${COMMON[@]}" --cocomix --concept-topk "${TOPK}" \
    --concept-labels "${OUT}/labels_${SIZE}"
