#!/usr/bin/env bash
# The paper's baselines and ablations next to CoCoMix, same data, schedule and launch as the paper configs.
#
#   MODE=kd            knowledge distillation: NTP model (the parameter-matched width) trained on
#                      CE + 0.1 x KL(teacher || student) over the next-token distributions (--kd --kd-weight 0.1)
#   MODE=pause         pause tokens: the CoCoMix backbone with a learned vector interleaved after every token
#                      at the concept layer instead of the predicted concept (same compute as CoCoMix)
#   MODE=add           additive mixing: CoCoMix with h + c^ instead of interleaving (--concept-mixing add)
#   MODE=concept-only  concept prediction only: the concept loss trains the predictor, nothing is mixed into
#                      the stream (--concept-mixing none)
#   MODE=mixing-only   concept mixing without the concept loss (--no-concept-loss)
#   SIZE=69m | 386m | 1.38b  (default 69m, where the paper runs its ablations)
#
# Usage (from anywhere):
#   MODE=kd SIZE=386m DATA_PATH=/data/owt_text_document TEACHER=/models/gpt2 \
#   CHECKPOINT_DIR=/ckpt/kd_386m bash examples/pretrain_baselines.sh [extra flags...]
#   MODE=add DATA_PATH=... TEACHER=... SAE=/models/sae/gpt2_v5_32k_layer6.pt CHECKPOINT_DIR=... \
#       bash examples/pretrain_baselines.sh
# Inputs are those of examples/pretrain_cocomix_69m.sh (kd needs no SAE; pause needs neither teacher nor SAE).
# Extra flags are appended and win over the ones below. Launcher settings: see examples/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODE="${MODE:-}"
SIZE="${SIZE:-69m}"
case "${MODE}" in
    kd | pause | add | concept-only | mixing-only) ;;
    "") die "MODE is not set: one of kd, pause, add, concept-only, mixing-only" ;;
    *) die "MODE=${MODE}: expected one of kd, pause, add, concept-only, mixing-only" ;;
esac

# ---- the paper's sizes (shared/DESIGN.md section 5): CoCoMix width / NTP width / layers / heads / L / LR ---------
case "${SIZE}" in
    69m)   COCOMIX_HIDDEN=512;  NTP_HIDDEN=624;  LAYERS=8;  HEADS=8;  CONCEPT_LAYER=3; LR=6e-4; MIN_LR=6e-5
           GLOBAL_BATCH_SIZE=512;  DEFAULT_MICRO_BATCH=16; DEFAULT_TP=1 ;;
    386m)  COCOMIX_HIDDEN=1024; NTP_HIDDEN=1072; LAYERS=24; HEADS=16; CONCEPT_LAYER=5; LR=3e-4; MIN_LR=3e-5
           GLOBAL_BATCH_SIZE=512;  DEFAULT_MICRO_BATCH=8;  DEFAULT_TP=1 ;;
    1.38b) COCOMIX_HIDDEN=2048; NTP_HIDDEN=2096; LAYERS=24; HEADS=16; CONCEPT_LAYER=5; LR=2e-4; MIN_LR=2e-5
           GLOBAL_BATCH_SIZE=1024; DEFAULT_MICRO_BATCH=8;  DEFAULT_TP=2 ;;
    *) die "SIZE=${SIZE}: expected 69m, 386m or 1.38b" ;;
esac

# ---- inputs ---------------------------------------------------------------------------------------------------
# DATA_PATH, CHECKPOINT_DIR always; TEACHER (a local Hugging Face GPT-2 directory) for every mode but pause;
# SAE (GPT-2 hidden_states[6] TopK SAE, .pt or folder) for add, concept-only and mixing-only.
require_var DATA_PATH "the --data-path prefix of the tokenised training data (tools/preprocess_data.py output)"
require_var CHECKPOINT_DIR "the directory for checkpoints and tensorboard logs"
check_data_path "${DATA_PATH}"
VOCAB_FILE="${VOCAB_FILE:-${REPO_DIR}/examples/data/gpt2/encoder.json}"
MERGE_FILE="${MERGE_FILE:-${REPO_DIR}/examples/data/gpt2/vocab.bpe}"

case "${MODE}" in
    kd)
        require_var TEACHER "the path of a local Hugging Face GPT-2 directory (the KD teacher)"
        check_teacher "${TEACHER}"
        HIDDEN="${NTP_HIDDEN}"
        METHOD_ARGS=(--kd --kd-weight 0.1 --teacher-model "${TEACHER}")
        ;;
    pause)
        HIDDEN="${COCOMIX_HIDDEN}"
        METHOD_ARGS=(--pause-tokens --concept-layer "${CONCEPT_LAYER}")
        ;;
    add | concept-only | mixing-only)
        require_var TEACHER "the path of a local Hugging Face GPT-2 directory (the concept teacher)"
        require_var SAE "the path of the GPT-2 layer-6 TopK SAE (.pt file or SAELens folder)"
        check_teacher "${TEACHER}"
        check_sae "${SAE}"
        HIDDEN="${COCOMIX_HIDDEN}"
        METHOD_ARGS=(
            --cocomix --concept-layer "${CONCEPT_LAYER}"
            --concept-topk 32 --concept-num-labels 4 --concept-loss-weight 0.1
            --concept-labels online --teacher-model "${TEACHER}" --teacher-layer 6 --sae "${SAE}"
        )
        case "${MODE}" in
            add) METHOD_ARGS+=(--concept-mixing add) ;;
            concept-only) METHOD_ARGS+=(--concept-mixing none) ;;
            mixing-only) METHOD_ARGS+=(--concept-mixing interleave --no-concept-loss) ;;
        esac
        ;;
esac
HIDDEN="${HIDDEN_SIZE:-${HIDDEN}}"  # HIDDEN_SIZE overrides the width (e.g. a parameter-matched pause model)

# ---- batch and length (as the paper configs) -----------------------------------------------------------------
SEQ_LENGTH=1024
MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-${DEFAULT_MICRO_BATCH}}"
TRAIN_TOKENS="${TRAIN_TOKENS:-20000000000}"
TOKENS_PER_STEP=$((GLOBAL_BATCH_SIZE * SEQ_LENGTH))
TRAIN_ITERS=$(((TRAIN_TOKENS + TOKENS_PER_STEP - 1) / TOKENS_PER_STEP))  # 38147 (0.5M batches), 19074 (1M)
WARMUP_ITERS=$((TRAIN_ITERS / 300))
TP="${TP:-${DEFAULT_TP}}"

MODEL_ARGS=(
    --num-layers "${LAYERS}" --hidden-size "${HIDDEN}" --num-attention-heads "${HEADS}"
    --seq-length "${SEQ_LENGTH}" --max-position-embeddings "${SEQ_LENGTH}"
    --position-embedding-type learned_absolute --normalization LayerNorm
    --attention-dropout 0.1 --hidden-dropout 0.1
)
PARALLEL_ARGS=(--tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP:-1}")
[ "${TP}" -gt 1 ] && PARALLEL_ARGS+=(--sequence-parallel)
read -r -a DATA_PATH_TOKENS <<< "${DATA_PATH}"
DATA_ARGS=(
    --data-path "${DATA_PATH_TOKENS[@]}" --split 969,30,1
    --tokenizer-type GPT2BPETokenizer --vocab-file "${VOCAB_FILE}" --merge-file "${MERGE_FILE}"
    --num-workers 2
)
TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE}" --global-batch-size "${GLOBAL_BATCH_SIZE}"
    --train-iters "${TRAIN_ITERS}"
    --lr "${LR}" --min-lr "${MIN_LR}" --lr-decay-style cosine --lr-warmup-iters "${WARMUP_ITERS}"
    --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --weight-decay 0.1 --clip-grad 1.0
    --bf16 --seed 1234
)
OUTPUT_ARGS=(
    --log-interval 10 --eval-interval 1000 --eval-iters 20
    --save "${CHECKPOINT_DIR}" --load "${CHECKPOINT_DIR}" --save-interval 1000
    --tensorboard-dir "${CHECKPOINT_DIR}/tensorboard"
)

[ -n "${DRY_RUN:-}" ] || mkdir -p "${CHECKPOINT_DIR}"
launch pretrain_cocomix.py "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${METHOD_ARGS[@]}" "${DATA_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
