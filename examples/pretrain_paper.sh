#!/usr/bin/env bash
# The paper's runs at 69M, 386M or 1.38B: CoCoMix, its parameter-matched NTP baseline, and the other baselines
# and ablations, on 1 node x 8 GPUs unless the launcher settings (examples/common.sh) say otherwise.
#
#   SIZE    69m | 386m | 1.38b (required)
#   METHOD  cocomix (default)
#           ntp           next-token prediction, widened to CoCoMix's parameter count (configs/SIZE.ntp.args)
#           kd            knowledge distillation: the NTP model trained on CE + 0.1 x KL(teacher || student)
#           pause         pause tokens: CoCoMix's backbone with a learned vector interleaved after every token at
#                         the concept layer instead of the predicted concept (CoCoMix's compute, no concepts)
#           add           CoCoMix with additive mixing, h + c^ instead of interleaving
#           concept-only  the concept loss trains the predictor; nothing is mixed into the stream
#           mixing-only   concept mixing without the concept loss
#
# The flags live in examples/configs/, one file per concern, so that a size or method differs from the others
# only where the paper says it does:
#   paper.args + SIZE.args [+ SIZE.ntp.args (ntp, kd) | cocomix.args (cocomix, add, concept-only, mixing-only)]
#   + the method's flags below + the inputs + the schedule + the overrides + your extra flags.
# Later flags win (argparse keeps the last), so extra flags on this script's command line override everything,
# e.g. `--train-iters 100 --lr-warmup-iters 1 --eval-interval 50` for a smoke test (warmup must stay below the
# decay steps).
#
# Usage (from anywhere):
#   SIZE=386m DATA_PATH=/data/owt_text_document TEACHER=/models/gpt2 SAE=/models/sae/gpt2_v5_32k_layer6.pt \
#   CHECKPOINT_DIR=/ckpt/cocomix_386m bash examples/pretrain_paper.sh [extra flags...]
#   SIZE=386m METHOD=ntp DATA_PATH=... CHECKPOINT_DIR=/ckpt/ntp_386m bash examples/pretrain_paper.sh
#   LAUNCHER=deepspeed ... bash examples/pretrain_paper.sh      # DeepSpeed launcher + ZeRO-1
#   DRY_RUN=1 ... bash examples/pretrain_paper.sh               # print the command only
#   CONCEPT_LABELS=/labels/owt_386m EXTRACT_LABELS=1 ... bash examples/pretrain_paper.sh
#       precompute the concept labels once for exactly these training samples (tools/extract_concepts.py)
#   CONCEPT_LABELS=/labels/owt_386m ... bash examples/pretrain_paper.sh
#       then train from them: no teacher forward/backward in the training step
#
# Inputs:
#   DATA_PATH       tokenised training data: the prefix of a .bin/.idx pair written by tools/preprocess_data.py with
#                   the GPT-2 tokenizer (OpenWebText in the paper), or a blend "W1 PREFIX1 W2 PREFIX2". Required.
#   CHECKPOINT_DIR  checkpoints (resumed from automatically) and tensorboard logs. Required.
#   TEACHER         a local Hugging Face GPT-2 (124M) directory: config.json, model.safetensors and the GPT-2
#                   tokenizer files (the teacher must tokenise like the student). Nothing is downloaded.
#                   For kd and for the concept methods when the labels are computed online.
#   SAE             the OpenAI TopK SAE for GPT-2 small's residual stream at hidden_states[6] (v5, 32768 latents,
#                   k 32): the OpenAI .pt state dict, or a folder from tools/import_openai_sae.py. With TEACHER.
#   CONCEPT_LABELS  precomputed labels (the .bin/.idx/.json prefix) for the concept methods; with EXTRACT_LABELS=1,
#                   where to write them.
# Overrides: TP, PP, MICRO_BATCH_SIZE (the layout; the global batch stays the paper's), TRAIN_TOKENS (default 20B,
# the paper's tables; 200B for its headline curve), HIDDEN_SIZE (e.g. a parameter-matched pause model),
# VOCAB_FILE and MERGE_FILE (default: the GPT-2 files in examples/data/gpt2/).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CONFIGS="${EXAMPLES_DIR}/configs"

# The multi-node launchers used to take CONFIG=<script name>; refusing it beats silently running the default size.
[ -z "${CONFIG:-}" ] || die "CONFIG=${CONFIG}: the per-size scripts became SIZE=69m|386m|1.38b METHOD=cocomix|ntp|..."
SIZE="${SIZE:-}"
METHOD="${METHOD:-cocomix}"
case "${SIZE}" in
    69m | 386m | 1.38b) ;;
    "") die "SIZE is not set: one of 69m, 386m, 1.38b" ;;
    *) die "SIZE=${SIZE}: expected 69m, 386m or 1.38b" ;;
esac
case "${METHOD}" in
    cocomix)      METHOD_FILE=cocomix.args;        METHOD_ARGS=() ;;
    ntp)          METHOD_FILE="${SIZE}.ntp.args";  METHOD_ARGS=() ;;
    kd)           METHOD_FILE="${SIZE}.ntp.args";  METHOD_ARGS=(--kd --kd-weight 0.1) ;;
    pause)        METHOD_FILE=;                    METHOD_ARGS=(--pause-tokens) ;;
    add)          METHOD_FILE=cocomix.args;        METHOD_ARGS=(--concept-mixing add) ;;
    concept-only) METHOD_FILE=cocomix.args;        METHOD_ARGS=(--concept-mixing none) ;;
    mixing-only)  METHOD_FILE=cocomix.args;        METHOD_ARGS=(--no-concept-loss) ;;
    *) die "METHOD=${METHOD}: expected one of cocomix, ntp, kd, pause, add, concept-only, mixing-only" ;;
esac
CONCEPTS=  # the methods built on cocomix.args, which need concept labels (online or precomputed)
[ "${METHOD_FILE}" != cocomix.args ] || CONCEPTS=1

# ---- inputs: checked here so that a typo fails in a second, not after the job has queued and loaded ----------
require_var DATA_PATH "the --data-path prefix of the tokenised training data (see the comment above)"
require_var CHECKPOINT_DIR "the directory for checkpoints and tensorboard logs"
check_data_path "${DATA_PATH}"
CONCEPT_LABELS="${CONCEPT_LABELS:-}"
EXTRACT_LABELS="${EXTRACT_LABELS:-}"
[ -z "${EXTRACT_LABELS}" ] || [ -n "${CONCEPTS}" ] || die "EXTRACT_LABELS: METHOD=${METHOD} uses no concept labels"
ONLINE=
if [ -n "${CONCEPTS}" ] && { [ -z "${CONCEPT_LABELS}" ] || [ -n "${EXTRACT_LABELS}" ]; }; then
    ONLINE=1
    require_var TEACHER "the path of a local Hugging Face GPT-2 directory (see the comment above)"
    require_var SAE "the path of the GPT-2 layer-6 TopK SAE (.pt file or SAELens folder; see the comment above)"
    check_teacher "${TEACHER}"
    check_sae "${SAE}"
elif [ "${METHOD}" = kd ]; then
    require_var TEACHER "the path of a local Hugging Face GPT-2 directory (the KD teacher)"
    check_teacher "${TEACHER}"
fi

# ---- the command line, in the order in which later flags override earlier ones ---------------------------------
ARGS=()
read_args "${CONFIGS}/paper.args"
read_args "${CONFIGS}/${SIZE}.args"
[ -z "${METHOD_FILE}" ] || read_args "${CONFIGS}/${METHOD_FILE}"
ARGS+=("${METHOD_ARGS[@]}")
if [ -n "${ONLINE}" ]; then
    ARGS+=(--concept-labels online --teacher-model "${TEACHER}" --sae "${SAE}")
elif [ -n "${CONCEPTS}" ]; then
    check_concept_labels "${CONCEPT_LABELS}"
    ARGS+=(--concept-labels "${CONCEPT_LABELS}")
elif [ "${METHOD}" = kd ]; then
    ARGS+=(--teacher-model "${TEACHER}")
fi
read -r -a DATA_PATH_TOKENS <<< "${DATA_PATH}"
ARGS+=(--data-path "${DATA_PATH_TOKENS[@]}"
       --vocab-file "${VOCAB_FILE:-${REPO_DIR}/examples/data/gpt2/encoder.json}"
       --merge-file "${MERGE_FILE:-${REPO_DIR}/examples/data/gpt2/vocab.bpe}")

# The paper fixes tokens, not steps: ceil(TRAIN_TOKENS / batch tokens) steps, 1/300 of them warmup.
TRAIN_TOKENS="${TRAIN_TOKENS:-20000000000}"
GLOBAL_BATCH_SIZE="$(flag_value --global-batch-size)"
SEQ_LENGTH="$(flag_value --seq-length)"
TOKENS_PER_STEP=$((GLOBAL_BATCH_SIZE * SEQ_LENGTH))
TRAIN_ITERS=$(((TRAIN_TOKENS + TOKENS_PER_STEP - 1) / TOKENS_PER_STEP))
ARGS+=(--train-iters "${TRAIN_ITERS}" --lr-warmup-iters $((TRAIN_ITERS / 300)))

[ -z "${TP:-}" ] || ARGS+=(--tensor-model-parallel-size "${TP}")
[ -z "${PP:-}" ] || ARGS+=(--pipeline-model-parallel-size "${PP}")
[ -z "${MICRO_BATCH_SIZE:-}" ] || ARGS+=(--micro-batch-size "${MICRO_BATCH_SIZE}")
[ -z "${HIDDEN_SIZE:-}" ] || ARGS+=(--hidden-size "${HIDDEN_SIZE}")

if [ -n "${EXTRACT_LABELS}" ]; then
    require_var CONCEPT_LABELS "the output prefix for the precomputed concept labels"
    # The training flags themselves, so the labels cover exactly its samples (same data, split, seed, steps).
    launch tools/extract_concepts.py "${ARGS[@]}" --output-prefix "${CONCEPT_LABELS}" "$@"
else
    [ -n "${DRY_RUN:-}" ] || mkdir -p "${CHECKPOINT_DIR}"
    launch pretrain_cocomix.py "${ARGS[@]}" --save "${CHECKPOINT_DIR}" --load "${CHECKPOINT_DIR}" \
        --tensorboard-dir "${CHECKPOINT_DIR}/tensorboard" "$@"
fi
