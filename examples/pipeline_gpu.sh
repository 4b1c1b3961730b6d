#!/usr/bin/env bash
# CoCoMix end to end at the paper's 69M scale on GPUs, on your own tokenised corpus, from local files only:
# the stages of examples/pipeline.sh with a pretrained teacher, the paper's configurations (examples/configs/,
# through examples/pretrain_paper.sh) and torchrun on every GPU.
#
#   DATA=/data/owt_text_document TEACHER_MODEL=/models/gpt2 bash examples/pipeline_gpu.sh
#   DATA=... TEACHER_MODEL=/models/gpt2 SAE=/models/sae/v5_32k_layer_6.pt bash examples/pipeline_gpu.sh
#   TEACHER=smollm2 DATA=/data/owt_smollm2_text_document TEACHER_MODEL=/models/SmolLM2-135M bash examples/pipeline_gpu.sh
#   DRY_RUN=1 DATA=... TEACHER_MODEL=... bash examples/pipeline_gpu.sh   # every stage's command and estimate; runs nothing
#
# Tokenising is yours, once, on CPUs (tools/preprocess_data.py writes PREFIX_text_document.{bin,idx}); with the
# GPT-2 teacher, GPT-2's BPE:
#   python tools/preprocess_data.py --input /data/openwebtext/ --output-prefix /data/owt \
#       --tokenizer-type GPT2BPETokenizer --vocab-file examples/data/gpt2/encoder.json \
#       --merge-file examples/data/gpt2/vocab.bpe --append-eod --workers 32          # -> DATA=/data/owt_text_document
# with SmolLM2, its tokenizer: --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/SmolLM2-135M (for a
# .gguf, write the tokenizer first: python tools/export_tokenizer.py --model FILE.gguf --output DIR).
#
# Inputs (environment; each is checked before anything runs, a missing one is one `error:` line):
#   DATA           the .bin/.idx prefix of the corpus. Its documents split 969,30,1 (paper.args' --split) into
#                  training / validation / the test documents of the final evaluation.
#   TEACHER        gpt2 (default) or smollm2
#   TEACHER_MODEL  gpt2: a local Hugging Face GPT-2 124M directory (config.json, weights, tokenizer files);
#                  smollm2: a local SmolLM2-135M directory or .gguf file. Nothing is downloaded.
#   SAE            train (default): a TopK SAE trained here on the teacher's hidden_states[6] (tools/train_sae.py;
#                  SAE_LATENTS default 32768, the paper's C that the NTP width is matched to; SAE_K 32;
#                  SAE_TOKENS default 1000000000);
#                  or OpenAI's GPT-2 v5 32k layer-6 SAE file (v5_32k_layer_6.pt), converted with
#                  tools/import_openai_sae.py; or an SAE folder (SAELens / sparsify) used as it is.
#   LABELS         precomputed (default): stage 4 labels the students' training samples once; online: skip it,
#                  the CoCoMix student runs the teacher and the SAE in its training step.
#   TRAIN_TOKENS   tokens per student, default 20000000000 (the paper's 20B); sets --train-iters from the 512 x
#                  1024-token global batch (pretrain_paper.sh). Every student sees the same samples.
#   TASK_DATA_DIR  optional: zero-shot tasks in the evaluation, the paper's Table 1 (tools/evaluate.py --tasks TASKS
#                  --task-data-dir; TASKS default lambada_openai,wikitext,hellaswag,piqa,social_iqa,arc_easy,
#                  winogrande; the files: docs/evaluation.md, "Zero-shot tasks")
#   DATA_NAME      the corpus's name heading its perplexity column (default OpenWebText, the paper's corpus)
#   EVAL_DOCUMENTS optional: score only the first N test documents
#   RUN_DIR        default runs/pipeline_gpu_TEACHER; PYTHON (default python3) runs the one-process tools
# Launch: NPROC_PER_NODE (default 8) processes per node under torchrun. Several nodes: run this script on every
# node with NNODES, MASTER_ADDR (MASTER_PORT, RDZV_BACKEND, RDZV_ID as examples/multinode/launch_torchrun.sh)
# and NODE_RANK; RUN_DIR on a filesystem all nodes share. Node 0 runs the one-process steps and writes the stage
# markers; the others join the torchrun stages once node 0 has finished the stage before. TP, PP,
# MICRO_BATCH_SIZE and ZERO_STAGE reach the students as in pretrain_paper.sh.
#
# Stages, each a tool of this project, each logged to RUN_DIR/logs/<stage>.log:
#   1 data      tools/inspect_data.py: the .bin/.idx pair is sound and its ids are inside the teacher's vocabulary
#               (SmolLM2 .gguf: tools/export_tokenizer.py writes its tokenizer first)
#   2 teacher   no training at this scale: tools/convert_from_hf.py imports TEACHER_MODEL, and tools/evaluate.py
#               gives its perplexity on 200 test documents, a check that DATA is the teacher's tokenisation
#   3 sae       tools/train_sae.py under torchrun (or tools/import_openai_sae.py); tools/eval_sae.py on held-out
#               windows: FVU, L0, dead fraction, delta LM loss
#   4 labels    tools/extract_concepts.py under torchrun for exactly the CoCoMix run's training samples
#               (pretrain_paper.sh EXTRACT_LABELS=1); skipped with LABELS=online
#   5-7         CoCoMix 69M, the parameter-matched NTP 69M (configs/69m.ntp.args) and KD 69M: pretrain_paper.sh
#               SIZE=69m METHOD=cocomix|ntp|kd, the same data, tokens and seed
#   8 evaluate  tools/evaluate.py: held-out perplexity on the test documents of the three students and the teacher,
#               CoCoMix's concept accuracy against the teacher's labels, the zero-shot tasks with TASK_DATA_DIR;
#               tools/plot_runs.py: the training curves and the tokens CoCoMix and KD save at NTP's validation
#               perplexity (docs/tokens_saved.md). RUN_DIR/results.md (the tables, then the tokens saved),
#               results.json, curves.png
# A finished stage writes RUN_DIR/stages/<stage>.done and is skipped by a re-run; a stage killed half-way resumes
# from its checkpoints (SAE, students) or finished chunks (labels). Delete a marker to redo its stage.
#
# Expected time on 8 H100 / H200 (examples/pipeline_gpu_estimate.py, printed at the start of every run from the
# FLOP count of megatron_cocomix/training/flops.py; GPT-2 teacher, SAE=train, precomputed labels, 20B tokens):
#
#   | stage | work | tokens | bf16 FLOPs | fp32 FLOPs | GPUs | hours | parameters | GiB/GPU |
#   |---|---|---|---|---|---|---|---|---|
#   | sae | TopK SAE (32768 latents, k 32) on hidden_states[6], 7637 steps | 1.0B | - | 1.95e+17 | 8 | 0.13 | - | - |
#   | labels | concept labels of the students' 19.5M samples | 20.0B | - | 9.95e+18 | 8 | 6.44 | - | - |
#   | cocomix | CoCoMix 69M, precomputed labels, 38147 steps | 20.0B | 1.15e+19 | - | 8 | 2.12 | 85.1M | 9.4 |
#   | ntp | NTP 69M (parameter-matched), 38147 steps | 20.0B | 8.87e+18 | - | 8 | 1.64 | 69.5M | 6.3 |
#   | kd | KD 69M (parameter-matched), 38147 steps | 20.0B | 8.87e+18 | 5.32e+18 | 8 | 5.08 | 69.5M | 6.3 |
#   | evaluate | perplexity (3 students, teacher), concept accuracy | 9.0M | - | 1.97e+16 | 1 | 0.10 | - | - |
#   | total | | | 2.92e+19 | 1.55e+19 | | 15.5 | | |
#
# LABELS=online folds the labels stage into CoCoMix's (one row of 8.56 h instead of 6.44 + 2.12). The teacher and
# the SAE run in fp32 (--teacher-dtype fp32), so the labels stage and KD's teacher cost more than their FLOPs
# suggest. The hours leave out communication, data loading and non-matmul work and assume the utilisation
# measured at 386M (benchmarks/gpu_h200.md): read them as lower bounds. Stages 1-2 take minutes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PYTHON="${PYTHON:-python3}"
TEACHER="${TEACHER:-gpt2}"
SAE="${SAE:-train}"
LABELS="${LABELS:-precomputed}"
TRAIN_TOKENS="${TRAIN_TOKENS:-20000000000}"
SAE_TOKENS="${SAE_TOKENS:-1000000000}"
SAE_K="${SAE_K:-32}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
NNODES="${NNODES:-1}"
TASKS="${TASKS:-lambada_openai,wikitext,hellaswag,piqa,social_iqa,arc_easy,winogrande}"
DATA_NAME="${DATA_NAME:-OpenWebText}"
RUN_DIR="${RUN_DIR:-runs/pipeline_gpu_${TEACHER}}"

# ---------------------------------------------------------------------------------------------------- inputs
case "${TEACHER}" in
    gpt2 | smollm2) ;;
    *) die "TEACHER=${TEACHER}: expected gpt2 or smollm2" ;;
esac
# The paper's C (OpenAI's v5 32k SAE), which the NTP width of configs/69m.ntp.args is parameter-matched to.
SAE_LATENTS="${SAE_LATENTS:-32768}"
case "${LABELS}" in
    precomputed | online) ;;
    *) die "LABELS=${LABELS}: expected precomputed or online" ;;
esac
for name in TRAIN_TOKENS SAE_TOKENS SAE_LATENTS SAE_K NPROC_PER_NODE NNODES; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || die "${name}=${!name}: expected a positive integer"
done
require_var DATA "the .bin/.idx prefix of your tokenised corpus (see the top of examples/pipeline_gpu.sh)"
[ -f "${DATA}.bin" ] && [ -f "${DATA}.idx" ] || \
    die "DATA=${DATA}: no ${DATA}.bin / ${DATA}.idx (the prefix tools/preprocess_data.py writes, e.g. /data/owt_text_document)"
require_var TEACHER_MODEL "the local teacher: a Hugging Face GPT-2 124M directory (TEACHER=gpt2) or a SmolLM2-135M directory or .gguf (TEACHER=smollm2)"
if [ -d "${TEACHER_MODEL}" ]; then
    [ -f "${TEACHER_MODEL}/config.json" ] || die "TEACHER_MODEL=${TEACHER_MODEL}: directory without config.json (expected a Hugging Face model directory)"
elif [ -f "${TEACHER_MODEL}" ] && [ "${TEACHER}" = smollm2 ] && [[ "${TEACHER_MODEL}" == *.gguf ]]; then
    :
elif [ -e "${TEACHER_MODEL}" ]; then
    die "TEACHER_MODEL=${TEACHER_MODEL}: expected a Hugging Face model directory$([ "${TEACHER}" = smollm2 ] && echo " or a .gguf file" || true)"
else
    die "TEACHER_MODEL=${TEACHER_MODEL}: no such file or directory"
fi
if [ "${SAE}" = train ]; then
    SAE_FINAL="${RUN_DIR}/sae/final"  # a link to the last iter_* of tools/train_sae.py
elif [ -f "${SAE}" ]; then
    SAE_FINAL="${RUN_DIR}/sae/imported"  # tools/import_openai_sae.py's folder
elif [ -d "${SAE}" ]; then
    [ -f "${SAE}/cfg.json" ] || die "SAE=${SAE}: folder without cfg.json (expected a SAELens or sparsify SAE folder)"
    SAE_FINAL="${SAE}"
else
    die "SAE=${SAE}: no such file or directory (expected train, OpenAI's v5_32k_layer_6.pt or an SAE folder)"
fi
if [ -n "${TASK_DATA_DIR:-}" ] && [ ! -d "${TASK_DATA_DIR}" ]; then
    die "TASK_DATA_DIR=${TASK_DATA_DIR}: no such directory"
fi
[ -z "${EVAL_DOCUMENTS:-}" ] || [[ "${EVAL_DOCUMENTS}" =~ ^[1-9][0-9]*$ ]] || \
    die "EVAL_DOCUMENTS=${EVAL_DOCUMENTS}: expected a positive integer"
FIRST_NODE=1
if [ "${NNODES}" -gt 1 ]; then
    require_var MASTER_ADDR "a host every node can reach (the first node), as examples/multinode/launch_torchrun.sh"
    require_var NODE_RANK "this node's rank, 0 .. NNODES-1 (node 0 runs the one-process steps)"
    if [ "${NODE_RANK}" != 0 ]; then FIRST_NODE=; fi
fi

# ---------------------------------------------------------------------------------------------------- settings
# The paper's values, read from the flag files pretrain_paper.sh joins, so that the SAE, the labels and the
# evaluation see what the students see.
ARGS=()
read_args "${EXAMPLES_DIR}/configs/paper.args"
read_args "${EXAMPLES_DIR}/configs/69m.args"
read_args "${EXAMPLES_DIR}/configs/cocomix.args"
SEQ=$(flag_value --seq-length)
SPLIT=$(flag_value --split)
SEED=$(flag_value --seed)
TEACHER_LAYER=$(flag_value --teacher-layer)
NUM_LABELS=$(flag_value --concept-num-labels)
# Validations per student (paper.args' --eval-interval over pretrain_paper.sh's steps): tokens saved needs 3.
EVAL_INTERVAL=$(flag_value --eval-interval)
TOKENS_PER_STEP=$(($(flag_value --global-batch-size) * SEQ))
STUDENT_ITERS=$(((TRAIN_TOKENS + TOKENS_PER_STEP - 1) / TOKENS_PER_STEP))
VALIDATIONS=$(((STUDENT_ITERS + EVAL_INTERVAL - 1) / EVAL_INTERVAL))
WORLD=$((NPROC_PER_NODE * NNODES))
SAE_SEQUENCES=16  # windows per rank per step: 16 x 1023 x 8 = 131K activations per step on 8 GPUs
SAE_ITERS=$(((SAE_TOKENS + SAE_SEQUENCES * (SEQ - 1) * WORLD - 1) / (SAE_SEQUENCES * (SEQ - 1) * WORLD)))
SAE_HELD_OUT=64  # the last windows of DATA: tools/train_sae.py leaves them out, tools/eval_sae.py scores them
LABELS_PREFIX="${RUN_DIR}/labels/train"
STUDENTS="${RUN_DIR}/students"
TEACHER_CHECKPOINT="${RUN_DIR}/teacher/checkpoint"

if [ "${TEACHER}" = gpt2 ]; then
    TOKENIZER_ARGS=(--tokenizer-type GPT2BPETokenizer
                    --vocab-file "${VOCAB_FILE:-${REPO_DIR}/examples/data/gpt2/encoder.json}"
                    --merge-file "${MERGE_FILE:-${REPO_DIR}/examples/data/gpt2/vocab.bpe}")
    STUDENT_EXTRA=()  # paper.args already has the GPT-2 tokenizer
else
    TOKENIZER_DIR="${TEACHER_MODEL}"
    [ -d "${TEACHER_MODEL}" ] || TOKENIZER_DIR="${RUN_DIR}/tokenizer"  # stage 1 exports the .gguf's
    TOKENIZER_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "${TOKENIZER_DIR}")
    STUDENT_EXTRA=("${TOKENIZER_ARGS[@]}")  # after the flag files, so they win
fi
export LAUNCHER=torchrun GPUS_PER_NODE="${NPROC_PER_NODE}" NNODES
RDZV_BASE="${RDZV_ID:-cocomix-pipeline}"
# pretrain_paper.sh's settings for every student and the labels: the inputs it would otherwise take from the
# caller's environment are cleared (TEACHER and SAE mean something else here; HIDDEN_SIZE would undo the
# parameter matching), then set per stage.
PAPER_ENV=(-u TEACHER -u SAE -u CONCEPT_LABELS -u EXTRACT_LABELS -u HIDDEN_SIZE -u CONFIG
           SIZE=69m DATA_PATH="${DATA}" TRAIN_TOKENS="${TRAIN_TOKENS}" PENDING_INPUTS="${SAE_FINAL} ${LABELS_PREFIX}")

# ---------------------------------------------------------------------------------------------------- estimate
ESTIMATE_ARGS=(--teacher "${TEACHER}" --teacher-model "${TEACHER_MODEL}" --labels "${LABELS}"
               --train-tokens "${TRAIN_TOKENS}" --sae-tokens "${SAE_TOKENS}" --gpus "${WORLD}")
if [ "${SAE}" = train ]; then
    ESTIMATE_ARGS+=(--sae train --num-latents "${SAE_LATENTS}" --sae-k "${SAE_K}")
else
    ESTIMATE_ARGS+=(--sae "${SAE}")
fi
ESTIMATE=$("${PYTHON}" "${EXAMPLES_DIR}/pipeline_gpu_estimate.py" "${ESTIMATE_ARGS[@]}")
# stage_estimate NAME: the hours column of NAME's row, as " (estimate: ~H h on G GPUs)".
stage_estimate() {
    awk -F'|' -v name=" $1 " '$2 == name { gsub(/ /, "", $7); gsub(/ /, "", $8);
        printf " (estimate: ~%s h on %s GPU%s)", $8, $7, ($7 == "1" ? "" : "s") }' <<< "${ESTIMATE}"
}

# ---------------------------------------------------------------------------------------------------- stages
# run COMMAND...: run it, or print it in a dry run.
run() {
    if [ -n "${DRY_RUN:-}" ]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}
# launch_tool TOOL ARGS...: a tool of this repository under torchrun on every GPU (common.sh's launch).
launch_tool() { (launch "$@"); }  # launch ends in exec: a subshell keeps this script alive
on_first_node() { [ -n "${FIRST_NODE}" ]; }

STAGE_NUMBER=0
STAGE_COUNT=$([ "${LABELS}" = online ] && echo 7 || echo 8)
PREVIOUS_STAGE=
# run_stage NAME KIND DESCRIPTION FUNCTION, KIND = local (one process, node 0) or torchrun (every node). Skipped
# when RUN_DIR/stages/NAME.done exists; the function's output is appended to RUN_DIR/logs/NAME.log.
run_stage() {
    local name=$1 kind=$2 description=$3 function=$4 start log head
    STAGE_NUMBER=$((STAGE_NUMBER + 1))
    head="[pipeline_gpu] ${STAGE_NUMBER}/${STAGE_COUNT} ${name}"
    if [ -n "${DRY_RUN:-}" ]; then
        echo "${head}: ${description}$(stage_estimate "${name}")"
        "${function}"
        return
    fi
    if [ -e "${RUN_DIR}/stages/${name}.done" ]; then
        echo "${head}: already done ($(cat "${RUN_DIR}/stages/${name}.done"))"
    elif on_first_node; then
        log="${RUN_DIR}/logs/${name}.log"
        echo "${head}: ${description}$(stage_estimate "${name}") (log: ${log})"
        start=$(date +%s)
        echo "=== $(date -u '+%Y-%m-%d %H:%M:%S') ${name}" >>"${log}"
        if ! (export RDZV_ID="${RDZV_BASE}-${name}"; "${function}") >>"${log}" 2>&1; then
            echo "[pipeline_gpu] ${name} failed; the end of ${log}:" >&2
            tail -n 15 "${log}" >&2
            exit 1
        fi
        echo "$(($(date +%s) - start)) s" >"${RUN_DIR}/stages/${name}.done"
        echo "${head}: done in $(($(date +%s) - start)) s"
    elif [ "${kind}" = local ]; then
        echo "${head}: on node 0"
    else
        # The stage's inputs are complete once node 0 has marked the stage before it done.
        [ -z "${PREVIOUS_STAGE}" ] || until [ -e "${RUN_DIR}/stages/${PREVIOUS_STAGE}.done" ]; do sleep 10; done
        log="${RUN_DIR}/logs/${name}.node${NODE_RANK}.log"
        echo "${head}: ${description} (log: ${log})"
        if ! (export RDZV_ID="${RDZV_BASE}-${name}"; "${function}") >>"${log}" 2>&1; then
            echo "[pipeline_gpu] ${name} failed on node ${NODE_RANK}; the end of ${log}:" >&2
            tail -n 15 "${log}" >&2
            exit 1
        fi
    fi
    PREVIOUS_STAGE="${name}"
}

check_data() {
    if [ "${TEACHER}" = smollm2 ] && [ ! -d "${TEACHER_MODEL}" ]; then
        run "${PYTHON}" "${REPO_DIR}/tools/export_tokenizer.py" --model "${TEACHER_MODEL}" --output "${TOKENIZER_DIR}"
    fi
    run "${PYTHON}" "${REPO_DIR}/tools/inspect_data.py" --data-path "${DATA}" "${TOKENIZER_ARGS[@]}"
}

teacher() {
    run "${PYTHON}" "${REPO_DIR}/tools/convert_from_hf.py" --hf-model "${TEACHER_MODEL}" \
        --output "${TEACHER_CHECKPOINT}" --seq-length "${SEQ}" --overwrite
    run "${PYTHON}" "${REPO_DIR}/tools/evaluate.py" --load "${TEACHER_CHECKPOINT}" --name teacher \
        --data-path "${DATA}" --split "${SPLIT}" --eval-split test --max-documents 200 --seq-length "${SEQ}" \
        --output-json "${RUN_DIR}/teacher/heldout.json" --output-md "${RUN_DIR}/teacher/heldout.md" --no-progress
}

sae() {
    if [ "${SAE}" = train ]; then
        launch_tool tools/train_sae.py --teacher-model "${TEACHER_MODEL}" --teacher-layer "${TEACHER_LAYER}" \
            --data-path "${DATA}" --seq-length "${SEQ}" --num-latents "${SAE_LATENTS}" --k "${SAE_K}" \
            --train-iters "${SAE_ITERS}" --sequences-per-step "${SAE_SEQUENCES}" --eval-sequences "${SAE_HELD_OUT}" \
            --seed "${SEED}" --save "${RUN_DIR}/sae" --save-interval 1000 \
            --tensorboard-dir "${RUN_DIR}/sae/tensorboard" --no-progress
        on_first_node || return 0
        if [ -n "${DRY_RUN:-}" ]; then
            echo "ln -sfn iter_<latest> ${SAE_FINAL}"
        else
            ln -sfn "$(printf 'iter_%07d' "$(cat "${RUN_DIR}/sae/latest_checkpointed_iteration.txt")")" "${SAE_FINAL}"
        fi
    elif [ "${SAE_FINAL}" != "${SAE}" ]; then
        run rm -rf "${SAE_FINAL}"  # an import killed half-way: tools/import_openai_sae.py refuses a used folder
        run "${PYTHON}" "${REPO_DIR}/tools/import_openai_sae.py" --input "${SAE}" --output "${SAE_FINAL}" \
            --layer "${TEACHER_LAYER}"
    fi
    run "${PYTHON}" "${REPO_DIR}/tools/eval_sae.py" --sae "${SAE_FINAL}" --teacher-model "${TEACHER_MODEL}" \
        --teacher-layer "${TEACHER_LAYER}" --data-path "${DATA}" --seq-length "${SEQ}" \
        --num-sequences "${SAE_HELD_OUT}" --output "${RUN_DIR}/sae/eval_sae.json" --no-progress
}

labels() {
    env "${PAPER_ENV[@]}" METHOD=cocomix EXTRACT_LABELS=1 CONCEPT_LABELS="${LABELS_PREFIX}" \
        TEACHER="${TEACHER_MODEL}" SAE="${SAE_FINAL}" CHECKPOINT_DIR="${STUDENTS}/cocomix" \
        bash "${EXAMPLES_DIR}/pretrain_paper.sh" "${STUDENT_EXTRA[@]}" --no-progress
}

# student NAME SETTINGS...: pretrain_paper.sh SIZE=69m METHOD=NAME, checkpoints and tensorboard in STUDENTS/NAME.
student() {
    local name=$1
    shift
    env "${PAPER_ENV[@]}" METHOD="${name}" CHECKPOINT_DIR="${STUDENTS}/${name}" "$@" \
        bash "${EXAMPLES_DIR}/pretrain_paper.sh" "${STUDENT_EXTRA[@]}"
}
cocomix() {
    if [ "${LABELS}" = online ]; then
        student cocomix TEACHER="${TEACHER_MODEL}" SAE="${SAE_FINAL}"
    else
        student cocomix CONCEPT_LABELS="${LABELS_PREFIX}"
    fi
}
ntp() { student ntp; }
kd() { student kd TEACHER="${TEACHER_MODEL}"; }

evaluate() {
    local extra=() curves=()
    [ -z "${EVAL_DOCUMENTS:-}" ] || extra+=(--max-documents "${EVAL_DOCUMENTS}")
    [ -z "${TASK_DATA_DIR:-}" ] || extra+=(--tasks "${TASKS}" --task-data-dir "${TASK_DATA_DIR}")
    run "${PYTHON}" "${REPO_DIR}/tools/evaluate.py" \
        --load "${STUDENTS}/cocomix" "${STUDENTS}/ntp" "${STUDENTS}/kd" "${TEACHER_CHECKPOINT}" \
        --name cocomix ntp kd teacher --data-path "${DATA}" --data-name "${DATA_NAME}" --split "${SPLIT}" \
        --eval-split test --seq-length "${SEQ}" --teacher-model "${TEACHER_MODEL}" --teacher-layer "${TEACHER_LAYER}" \
        --sae "${SAE_FINAL}" --concept-num-labels "${NUM_LABELS}" "${extra[@]}" \
        --output-json "${RUN_DIR}/results.json" --output-md "${RUN_DIR}/evaluate.md" --no-progress
    if [ "${VALIDATIONS}" -ge 3 ]; then
        curves=(--reference ntp --output-md "${RUN_DIR}/tokens_saved.md")
    elif [ -z "${DRY_RUN:-}" ]; then
        echo "Tokens saved at equal validation perplexity: not computed (the students validated ${VALIDATIONS} times," \
            "every ${EVAL_INTERVAL} of ${STUDENT_ITERS} steps; 3 validations are needed)." >"${RUN_DIR}/tokens_saved.md"
    fi
    run "${PYTHON}" "${REPO_DIR}/tools/plot_runs.py" "${STUDENTS}"/{cocomix,ntp,kd}/tensorboard \
        --name cocomix ntp kd "${curves[@]}" --output "${RUN_DIR}/curves.png"
    if [ -n "${DRY_RUN:-}" ]; then
        echo "(evaluate.md, a blank line and tokens_saved.md make ${RUN_DIR}/results.md)"
    else
        { cat "${RUN_DIR}/evaluate.md"; echo; cat "${RUN_DIR}/tokens_saved.md"; } >"${RUN_DIR}/results.md"
    fi
}

if [ -z "${DRY_RUN:-}" ]; then
    mkdir -p "${RUN_DIR}/stages" "${RUN_DIR}/logs" "${RUN_DIR}/sae" "${RUN_DIR}/teacher" "${RUN_DIR}/labels"
    if on_first_node; then echo "${ESTIMATE}" >"${RUN_DIR}/estimate.md"; fi
fi
PIPELINE_START=$(date +%s)
echo "${ESTIMATE}"
echo
run_stage data local "check the tokenised corpus" check_data
run_stage teacher local "import ${TEACHER} and its held-out perplexity" teacher
if [ "${SAE}" = train ]; then
    run_stage sae torchrun "train (${SAE_ITERS} steps) and evaluate the SAE" sae
else
    run_stage sae local "$([ "${SAE_FINAL}" = "${SAE}" ] || echo "import and ")evaluate the SAE" sae
fi
[ "${LABELS}" = online ] || run_stage labels torchrun "concept labels of the students' training samples" labels
run_stage cocomix torchrun "CoCoMix 69M (${LABELS} labels)" cocomix
run_stage ntp torchrun "NTP 69M (parameter-matched)" ntp
run_stage kd torchrun "KD 69M (parameter-matched)" kd
run_stage evaluate local "held-out perplexity, concept accuracy$([ -n "${TASK_DATA_DIR:-}" ] && echo ", zero-shot tasks" || true), curves" evaluate

if [ -z "${DRY_RUN:-}" ] && on_first_node; then
    echo
    cat "${RUN_DIR}/results.md"
    echo
    echo "[pipeline_gpu] finished in $(($(date +%s) - PIPELINE_START)) s; everything is under ${RUN_DIR}/:"
    echo "  results.md / results.json, curves.png / curves.csv, estimate.md, logs/ (one log per stage),"
    echo "  teacher/, sae/, labels/, students/{cocomix,ntp,kd}/ (checkpoints and tensorboard)"
fi
