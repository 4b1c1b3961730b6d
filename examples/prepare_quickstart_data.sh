#!/usr/bin/env bash
# Tokenise the shipped Shakespeare corpus with the GPT-2 BPE files into the Megatron .bin/.idx pair that
# examples/quickstart_args.txt trains on:
#     data_cache/shakespeare_text_document.{bin,idx}    (781 documents, 1505402 tokens, uint16; a few seconds)
# Idempotent: does nothing when the pair exists (tools/preprocess_data.py writes the .idx last, by rename, so an
# existing .idx means a complete pair). Set FORCE=1 to rebuild, PYTHON to pick the interpreter,
# OUTPUT_DIR to write elsewhere (then point --data-path at it).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
OUTPUT_DIR="${OUTPUT_DIR:-data_cache}"
PREFIX="${OUTPUT_DIR}/shakespeare"
DOCUMENT="${PREFIX}_text_document"

if [ -z "${FORCE:-}" ] && [ -s "${DOCUMENT}.bin" ] && [ -s "${DOCUMENT}.idx" ]; then
    echo "quickstart data: ${DOCUMENT}.{bin,idx} already exists (FORCE=1 rebuilds it)"
    exit 0
fi

mkdir -p "${OUTPUT_DIR}"
"${PYTHON}" tools/preprocess_data.py \
    --input examples/data/shakespeare.jsonl.gz \
    --output-prefix "${PREFIX}" \
    --tokenizer-type GPT2BPETokenizer \
    --vocab-file examples/data/gpt2/encoder.json \
    --merge-file examples/data/gpt2/vocab.bpe \
    --append-eod --workers 2 --quiet
echo "quickstart data: wrote ${DOCUMENT}.{bin,idx}"
