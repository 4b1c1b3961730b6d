#!/usr/bin/env bash
# CoCoMix 1.38B, the paper's largest configuration, on 1 node x 8 GPUs (TP2 x PP1 x DP4, sequence parallel).
# With LAUNCHER=deepspeed the optimizer is ZeRO-1 over the 4 data-parallel ranks; with torchrun it is
# megatron-core's distributed optimizer. TP=1 (DP8) with MICRO_BATCH_SIZE=4 fits too: the trainer's start-up
# estimate is ~25 GB per GPU for the student (weights, grads, optimizer shard, activations), ~21 GB at TP2.
#
#   student   GPT-2 style: 24 layers, hidden 2048, 16 heads, learned positions, LayerNorm, tied embeddings
#   concepts  layer at the input of block 5; C = 32768 concepts (read from the SAE), top-32 kept, 4 labels
#   teacher   GPT-2 124M, SAE on hidden_states[6] (the output of block 5), OpenAI TopK SAE v5 (32768, k 32)
#   training  20B tokens of 1M-token batches (1024 x 1024), AdamW (0.9, 0.95) eps 1e-8, wd 0.1, clip 1.0,
#             peak LR 2e-4, warmup 1/300 of the steps, cosine to 10% of the peak, bf16
#   baseline  examples/pretrain_ntp_1.38b.sh (hidden 2096, parameter-matched)
#
# Usage (from anywhere):
#   DATA_PATH=/data/owt_text_document TEACHER=/models/gpt2 SAE=/models/sae/gpt2_v5_32k_layer6.pt \
#   CHECKPOINT_DIR=/ckpt/cocomix_1.38b bash examples/pretrain_cocomix_1.38b.sh [extra flags...]
#   LAUNCHER=deepspeed ... bash examples/pretrain_cocomix_1.38b.sh       # DeepSpeed launcher + ZeRO-1
#   CONCEPT_LABELS=/labels/owt_1.38b EXTRACT_LABELS=1 ... bash examples/pretrain_cocomix_1.38b.sh
#       precompute the concept labels once for exactly these training samples (tools/extract_concepts.py)
#   CONCEPT_LABELS=/labels/owt_1.38b ... bash examples/pretrain_cocomix_1.38b.sh
#       then train from them: no teacher forward/backward in the training step
# Extra flags are appended to the training command and win over the ones below (argparse keeps the last),
# e.g. `--train-iters 100 --lr-warmup-iters 1 --eval-interval 50` for a smoke test (warmup must stay below
# the decay steps). Launcher settings: see examples/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- inputs (required) --------------------------------------------------------------------------------------
# DATA_PATH       tokenised training data: the prefix of a .bin/.idx pair written by tools/preprocess_data.py
#                 with the GPT-2 tokenizer (OpenWebText in the paper), or a blend "W1 PREFIX1 W2 PREFIX2".
# TEACHER         a local Hugging Face GPT-2 (124M) directory: config.json, model.safetensors and the GPT-2
#                 tokenizer files (the teacher must tokenise like the student). Nothing is downloaded.
# SAE             the OpenAI TopK SAE for GPT-2 small's residual stream at hidden_states[6] (v5, 32768
#                 latents, k 32): the OpenAI .pt state dict, or a folder from tools/import_openai_sae.py.
# CHECKPOINT_DIR  checkpoints (resumed from automatically) and tensorboard logs.
require_var DATA_PATH "the --data-path prefix of the tokenised training data (see the comment above)"
require_var CHECKPOINT_DIR "the directory for checkpoints and tensorboard logs"
check_data_path "${DATA_PATH}"
CONCEPT_LABELS="${CONCEPT_LABELS:-}"
if [ -z "${CONCEPT_LABELS}" ] || [ -n "${EXTRACT_LABELS:-}" ]; then
    require_var TEACHER "the path of a local Hugging Face GPT-2 directory (see the comment above)"
    require_var SAE "the path of the GPT-2 layer-6 TopK SAE (.pt file or SAELens folder; see the comment above)"
    check_teacher "${TEACHER}"
    check_sae "${SAE}"
fi
VOCAB_FILE="${VOCAB_FILE:-${REPO_DIR}/examples/data/gpt2/encoder.json}"
MERGE_FILE="${MERGE_FILE:-${REPO_DIR}/examples/data/gpt2/vocab.bpe}"

# ---- batch and length -----------------------------------------------------------------------------------------
SEQ_LENGTH=1024
GLOBAL_BATCH_SIZE=1024                      # 1024 x 1024 = 1048576 tokens per step (1M)
MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-8}"   # per GPU: 1024 / (8 x 4 DP) = 32 micro-batches per step
TRAIN_TOKENS="${TRAIN_TOKENS:-20000000000}" # 20B (the paper's tables); 200B for its headline curve
TOKENS_PER_STEP=$((GLOBAL_BATCH_SIZE * SEQ_LENGTH))
# ceil(20e9 / 1048576) = 19074 steps (20.0B tokens); the reference code rounds to 20000 steps.
TRAIN_ITERS=$(((TRAIN_TOKENS + TOKENS_PER_STEP - 1) / TOKENS_PER_STEP))
WARMUP_ITERS=$((TRAIN_ITERS / 300))         # 1/300 of the steps: 63

MODEL_ARGS=(
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16
    --seq-length "${SEQ_LENGTH}" --max-position-embeddings "${SEQ_LENGTH}"
    --position-embedding-type learned_absolute --normalization LayerNorm
    --attention-dropout 0.1 --hidden-dropout 0.1  # GPT-2's dropout, as the reference code
)
PARALLEL_ARGS=(
    --tensor-model-parallel-size "${TP:-2}" --pipeline-model-parallel-size "${PP:-1}"
    --sequence-parallel  # shards norm/dropout activations over the TP ranks; a no-op at TP=1
)
CONCEPT_ARGS=(
    --cocomix --concept-layer 5
    --concept-topk 32 --concept-num-labels 4 --concept-loss-weight 0.1
    --concept-mixing interleave --concept-attribution act
)
if [ -n "${CONCEPT_LABELS}" ] && [ -z "${EXTRACT_LABELS:-}" ]; then
    check_concept_labels "${CONCEPT_LABELS}"
    CONCEPT_ARGS+=(--concept-labels "${CONCEPT_LABELS}")
else
    CONCEPT_ARGS+=(--concept-labels online --teacher-model "${TEACHER}" --teacher-layer 6 --sae "${SAE}")
fi
read -r -a DATA_PATH_TOKENS <<< "${DATA_PATH}"
DATA_ARGS=(
    --data-path "${DATA_PATH_TOKENS[@]}" --split 969,30,1
    --tokenizer-type GPT2BPETokenizer --vocab-file "${VOCAB_FILE}" --merge-file "${MERGE_FILE}"
    --num-workers 2
)
TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE}" --global-batch-size "${GLOBAL_BATCH_SIZE}"
    --train-iters "${TRAIN_ITERS}"
    --lr 2e-4 --min-lr 2e-5 --lr-decay-style cosine --lr-warmup-iters "${WARMUP_ITERS}"
    --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --weight-decay 0.1 --clip-grad 1.0
    --bf16 --seed 1234
)
OUTPUT_ARGS=(
    --log-interval 10 --eval-interval 1000 --eval-iters 20
    --save "${CHECKPOINT_DIR}" --load "${CHECKPOINT_DIR}" --save-interval 1000
    --tensorboard-dir "${CHECKPOINT_DIR}/tensorboard"
)

if [ -n "${EXTRACT_LABELS:-}" ]; then
    require_var CONCEPT_LABELS "the output prefix for the precomputed concept labels"
    # The same flags as training, so the labels cover exactly its samples (same data, split, seed, steps).
    launch tools/extract_concepts.py "${MODEL_ARGS[@]}" "${CONCEPT_ARGS[@]}" "${DATA_ARGS[@]}" \
        "${TRAINING_ARGS[@]}" --output-prefix "${CONCEPT_LABELS}" "$@"
else
    [ -n "${DRY_RUN:-}" ] || mkdir -p "${CHECKPOINT_DIR}"
    launch pretrain_cocomix.py "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${CONCEPT_ARGS[@]}" "${DATA_ARGS[@]}" \
        "${TRAINING_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
fi
