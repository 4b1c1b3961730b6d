#!/usr/bin/env bash
# NTP baseline for CoCoMix 69M: plain next-token prediction, widened to hidden 624 so that it has as many
# parameters as the CoCoMix 69M model (hidden 512 + the d x C concept predictor; see tests/test_examples.py),
# on 1 node x 8 GPUs (TP1 x PP1 x DP8).
#
#   model     GPT-2 style: 8 layers, hidden 624, 8 heads (head dim 78), learned positions, LayerNorm,
#             tied embeddings
#   training  identical to examples/pretrain_cocomix_69m.sh: 20B tokens of 0.5M-token batches (512 x 1024),
#             AdamW (0.9, 0.95) eps 1e-8, wd 0.1, clip 1.0, peak LR 6e-4, warmup 1/300, cosine to 10%, bf16
#
# Usage (from anywhere):
#   DATA_PATH=/data/owt_text_document CHECKPOINT_DIR=/ckpt/ntp_69m bash examples/pretrain_ntp_69m.sh [extra flags...]
#   LAUNCHER=deepspeed ... bash examples/pretrain_ntp_69m.sh       # DeepSpeed launcher + ZeRO-1
# Extra flags are appended to the training command and win over the ones below (argparse keeps the last).
# Launcher settings: see examples/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- inputs (required) --------------------------------------------------------------------------------------
# DATA_PATH       tokenised training data: the prefix of a .bin/.idx pair written by tools/preprocess_data.py
#                 with the GPT-2 tokenizer (OpenWebText in the paper), or a blend "W1 PREFIX1 W2 PREFIX2".
# CHECKPOINT_DIR  checkpoints (resumed from automatically) and tensorboard logs.
require_var DATA_PATH "the --data-path prefix of the tokenised training data (see the comment above)"
require_var CHECKPOINT_DIR "the directory for checkpoints and tensorboard logs"
check_data_path "${DATA_PATH}"
VOCAB_FILE="${VOCAB_FILE:-${REPO_DIR}/examples/data/gpt2/encoder.json}"
MERGE_FILE="${MERGE_FILE:-${REPO_DIR}/examples/data/gpt2/vocab.bpe}"

# ---- batch and length -----------------------------------------------------------------------------------------
SEQ_LENGTH=1024
GLOBAL_BATCH_SIZE=512                       # 512 x 1024 = 524288 tokens per step (0.5M)
MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-16}"  # per GPU: 512 / (16 x 8 DP) = 4 micro-batches per step
TRAIN_TOKENS="${TRAIN_TOKENS:-20000000000}" # 20B (the paper's tables); 200B for its headline curve
TOKENS_PER_STEP=$((GLOBAL_BATCH_SIZE * SEQ_LENGTH))
# ceil(20e9 / 524288) = 38147 steps (20.0B tokens); the reference code rounds to 40000 steps.
TRAIN_ITERS=$(((TRAIN_TOKENS + TOKENS_PER_STEP - 1) / TOKENS_PER_STEP))
WARMUP_ITERS=$((TRAIN_ITERS / 300))         # 1/300 of the steps: 127

MODEL_ARGS=(
    --num-layers 8 --hidden-size 624 --num-attention-heads 8
    --seq-length "${SEQ_LENGTH}" --max-position-embeddings "${SEQ_LENGTH}"
    --position-embedding-type learned_absolute --normalization LayerNorm
    --attention-dropout 0.1 --hidden-dropout 0.1  # GPT-2's dropout, as the reference code
)
PARALLEL_ARGS=(
    --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
)
read -r -a DATA_PATH_TOKENS <<< "${DATA_PATH}"
DATA_ARGS=(
    --data-path "${DATA_PATH_TOKENS[@]}" --split 969,30,1
    --tokenizer-type GPT2BPETokenizer --vocab-file "${VOCAB_FILE}" --merge-file "${MERGE_FILE}"
    --num-workers 2
)
TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE}" --global-batch-size "${GLOBAL_BATCH_SIZE}"
    --train-iters "${TRAIN_ITERS}"
    --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-warmup-iters "${WARMUP_ITERS}"
    --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --weight-decay 0.1 --clip-grad 1.0
    --bf16 --seed 1234
)
OUTPUT_ARGS=(
    --log-interval 10 --eval-interval 1000 --eval-iters 20
    --save "${CHECKPOINT_DIR}" --load "${CHECKPOINT_DIR}" --save-interval 1000
    --tensorboard-dir "${CHECKPOINT_DIR}/tensorboard"
)

[ -n "${DRY_RUN:-}" ] || mkdir -p "${CHECKPOINT_DIR}"
launch pretrain_cocomix.py "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
