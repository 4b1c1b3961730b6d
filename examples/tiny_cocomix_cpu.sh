#!/usr/bin/env bash
# Tiny CoCoMix on CPU, a few minutes on 2 cores: the whole pipeline (teacher + SAE labels computed online,
# concept prediction, interleaved mixing, concept loss) on the shipped Shakespeare corpus.
#
#   bash examples/tiny_cocomix_cpu.sh                 # CoCoMix student
#   MODE=ntp bash examples/tiny_cocomix_cpu.sh        # the same student without concepts, same data and steps
#   bash examples/tiny_cocomix_cpu.sh --train-iters 50   # extra flags are appended (and win)
#
# 1. examples/prepare_quickstart_data.sh tokenises the corpus (skipped when done).
# 2. tools/make_tiny_teacher.py writes a random 3-layer GPT-2 teacher (width 64, the GPT-2 tokenizer) and a
#    random TopK SAE (512 latents, k 8) on its hidden_states[2] to runs/tiny_cocomix/assets (skipped when done).
#    Random weights give labels that are a fixed function of the context, so the concept loss can fall, but they
#    mean nothing: this checks the machinery, not the method (see examples/pretrain_paper.sh for that).
# 3. A 4-layer student (hidden 128, seq 128) with the concept layer at the input of block 2 trains for 200 steps
#    of 8 x 128 tokens; the log line shows lm loss and concept loss every 10 steps, validation every 50.
# Paths are resolved from the repository root, whatever the current directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
MODE="${MODE:-cocomix}"
RUN_DIR="${RUN_DIR:-runs/tiny_cocomix}"
ASSETS="${RUN_DIR}/assets"
case "${MODE}" in
    cocomix | ntp) ;;
    *) echo "error: MODE=${MODE}: expected cocomix or ntp" >&2; exit 2 ;;
esac

if [ -z "${DRY_RUN:-}" ]; then
    bash examples/prepare_quickstart_data.sh
    mkdir -p "${RUN_DIR}"
    if [ "${MODE}" = cocomix ]; then
        "${PYTHON}" tools/make_tiny_teacher.py --output-dir "${ASSETS}" \
            --vocab-file examples/data/gpt2/encoder.json --merge-file examples/data/gpt2/vocab.bpe \
            --layers 3 --hidden 64 --heads 4 --positions 256 --num-latents 512 --sae-k 8 --seed 0
    fi
fi

MODEL_ARGS=(
    --num-layers 4 --hidden-size 128 --num-attention-heads 4
    --seq-length 128 --max-position-embeddings 128
    --attention-dropout 0.0 --hidden-dropout 0.0
)
CONCEPT_ARGS=()
if [ "${MODE}" = cocomix ]; then
    CONCEPT_ARGS=(
        --cocomix --concept-layer 2 --concept-topk 8 --concept-num-labels 4 --concept-loss-weight 0.1
        --concept-mixing interleave --concept-labels online
        --teacher-model "${ASSETS}/teacher" --teacher-layer 2 --sae "${ASSETS}/sae"
    )
fi
DATA_ARGS=(
    --data-path data_cache/shakespeare_text_document --split 969,30,1
    --tokenizer-type GPT2BPETokenizer
    --vocab-file examples/data/gpt2/encoder.json --merge-file examples/data/gpt2/vocab.bpe
    --num-workers 1
)
TRAINING_ARGS=(
    --micro-batch-size 8 --global-batch-size 8 --train-iters 200
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --seed 1234
)
OUTPUT_ARGS=(
    --log-interval 10 --eval-interval 50 --eval-iters 10
    --tensorboard-dir "${RUN_DIR}/${MODE}/tensorboard"
)

CMD=("${PYTHON}" pretrain_cocomix.py "${MODEL_ARGS[@]}" "${CONCEPT_ARGS[@]}" "${DATA_ARGS[@]}"
     "${TRAINING_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@")
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${CMD[@]}"
    printf '\n'
else
    exec "${CMD[@]}"
fi
