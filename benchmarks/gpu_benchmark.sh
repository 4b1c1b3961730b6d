#!/usr/bin/env bash
# Throughput of one model size on one GPU: NTP (the parameter-matched wider model), CoCoMix with online labels
# (GPT-2-124M-shaped random teacher + 32768-latent random SAE: speed does not depend on the weights) with the
# default teacher precision and with --teacher-dtype bf16, and CoCoMix with precomputed labels
# (tools/extract_concepts.py first); seq 1024, bf16, dropout off, ITERS iterations each, a log line every 5.
# The log line gives tokens/s, TFLOP/s and MFU; the start-up report the FLOPs per iteration and the memory
# estimate; the last log line the measured memory. benchmarks/gpu_logs.py makes the table.
#
#   SIZE=386m bash benchmarks/gpu_benchmark.sh       # on a GPU machine (writes OUT/<size>_<run>.log); 69m, 1.38b too
#   SIZE=tiny bash benchmarks/gpu_benchmark.sh       # the same runs, tiny, on CPU: checks the script itself
# A run that fails leaves its log and the next run goes on (the table marks it failed).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
SIZE="${SIZE:-386m}"
OUT="${OUT:-benchmarks/results}"
ITERS="${ITERS:-20}"
mkdir -p "${OUT}"
bash examples/prepare_quickstart_data.sh >/dev/null || exit 1

# The paper's sizes (examples/configs/<size>.args, <size>.ntp.args) at the yardstick's micro-batch.
SEQ=1024; MBS=8; PRECISION=(--bf16); TOPK=32; TEACHER_LAYER=6
TEACHER=(--layers 12 --hidden 768 --heads 12 --positions 1024 --num-latents 32768 --sae-k 32)
case "${SIZE}" in
    69m)   COCOMIX_MODEL=(--num-layers 8 --hidden-size 512 --num-attention-heads 8 --concept-layer 3)
           NTP_MODEL=(--num-layers 8 --hidden-size 624 --num-attention-heads 8) ;;
    386m)  COCOMIX_MODEL=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --concept-layer 5)
           NTP_MODEL=(--num-layers 24 --hidden-size 1072 --num-attention-heads 16) ;;
    1.38b) COCOMIX_MODEL=(--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --concept-layer 5)
           NTP_MODEL=(--num-layers 24 --hidden-size 2096 --num-attention-heads 16); MBS=4 ;;
    tiny)  COCOMIX_MODEL=(--num-layers 4 --hidden-size 64 --num-attention-heads 4 --concept-layer 2)
           NTP_MODEL=(--num-layers 4 --hidden-size 72 --num-attention-heads 4)
           SEQ=64; MBS=2; PRECISION=(); TOPK=8; TEACHER_LAYER=2
           TEACHER=(--layers 3 --hidden 64 --heads 4 --positions 128 --num-latents 512 --sae-k 8) ;;
    *) echo "error: SIZE=${SIZE}: expected 69m, 386m, 1.38b or tiny" >&2; exit 2 ;;
esac
echo "size ${SIZE}: seq ${SEQ}, micro-batch ${MBS}"  # gpu_run.sh runs the yardstick at these
ASSETS="${OUT}/assets_$([ "${SIZE}" = tiny ] && echo tiny || echo gpt2)"
"${PYTHON}" tools/make_tiny_teacher.py --output-dir "${ASSETS}" "${TEACHER[@]}" --seed 0 >/dev/null || exit 1

COMMON=(
    --seq-length "${SEQ}" --max-position-embeddings "${SEQ}" --micro-batch-size "${MBS}" --global-batch-size "${MBS}"
    --train-iters "${ITERS}" --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 "${PRECISION[@]}"
    --attention-dropout 0 --hidden-dropout 0
    --data-path data_cache/shakespeare_text_document --tokenizer-type GPT2BPETokenizer
    --vocab-file examples/data/gpt2/encoder.json --merge-file examples/data/gpt2/vocab.bpe
    --log-interval 5 --eval-iters 0 --num-workers 2
)
TEACHER_FLAGS=(--teacher-model "${ASSETS}/teacher" --teacher-layer "${TEACHER_LAYER}" --sae "${ASSETS}/sae")
CONCEPTS=(--cocomix --concept-topk "${TOPK}" "${TEACHER_FLAGS[@]}")

run() { local name=$1; shift; echo "== ${name}"; "${PYTHON}" pretrain_cocomix.py "$@" > "${OUT}/${SIZE}_${name}.log" 2>&1 \
    || echo "   ${name} FAILED: $(grep -v -i warn "${OUT}/${SIZE}_${name}.log" | tail -1)"
    grep -E "iteration +${ITERS}/|FLOPs per iteration|memory estimate" "${OUT}/${SIZE}_${name}.log" | cut -c1-240; }

run ntp "${NTP_MODEL[@]}" "${COMMON[@]}"
run cocomix_online "${COCOMIX_MODEL[@]}" "${COMMON[@]}" "${CONCEPTS[@]}"
run cocomix_online_bf16 "${COCOMIX_MODEL[@]}" "${COMMON[@]}" "${CONCEPTS[@]}" --teacher-dtype bf16
# Precomputed labels for exactly these training samples, then the same student without a teacher in the step.
echo "== extract_concepts.py"
if "${PYTHON}" tools/extract_concepts.py "${COMMON[@]}" "${TEACHER_FLAGS[@]}" --output-prefix "${OUT}/labels_${SIZE}_${ITERS}" \
        --no-progress > "${OUT}/${SIZE}_extract.log" 2>&1; then
    run cocomix_precomputed "${COCOMIX_MODEL[@]}" "${COMMON[@]}" --cocomix --concept-topk "${TOPK}" \
        --concept-labels "${OUT}/labels_${SIZE}_${ITERS}"
else
    echo "   extract_concepts.py FAILED (no precomputed run): $(grep -v -i warn "${OUT}/${SIZE}_extract.log" | tail -1)"
fi
