# Sourced by examples/pretrain_paper.sh (and any launch script of your own): flag files, input checks and the
# launcher command line.
#
# Launcher settings, all from the environment:
#   LAUNCHER        torchrun (default) | deepspeed
#   GPUS_PER_NODE   processes per node (default 8)
#   NNODES          nodes (default 1). With NNODES > 1:
#                     torchrun:  run the same script on every node; RDZV_BACKEND=c10d (default) rendezvous at
#                                MASTER_ADDR:MASTER_PORT under RDZV_ID, or RDZV_BACKEND=static with NODE_RANK
#                     deepspeed: run once, on the first host of HOSTFILE; the launcher starts the other nodes
#                                over ssh (pdsh), so every node needs the same paths
#   MASTER_ADDR     address of the first node (default localhost); MASTER_PORT (default 6000)
#   MAX_RESTARTS    torchrun: restart the whole group this many times after a worker fails (default 2); each
#                   restart resumes from the last complete checkpoint (--load is --save)
#   NO_SSH=1        deepspeed with NNODES > 1: no ssh; run the launcher on every node with NODE_RANK (0 .. NNODES-1)
#   ZERO_STAGE      1 | 2 | 3: optimizer through DeepSpeed ZeRO with examples/ds_config_zero${ZERO_STAGE}.json
#                   (default 1 with LAUNCHER=deepspeed). Unset with torchrun: megatron-core's distributed
#                   optimizer (--use-distributed-optimizer). ZeRO-2/3 need --pipeline-model-parallel-size 1.
#   DRY_RUN=1       print the command instead of running it
# The ds_config files leave the batch sizes out: pretrain_cocomix.py fills train_batch_size,
# train_micro_batch_size_per_gpu and gradient_accumulation_steps from --global-batch-size,
# --micro-batch-size and the data-parallel size, and checks that the file agrees with --bf16 and --clip-grad.

EXAMPLES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "${EXAMPLES_DIR}")"

die() {
    echo "error: $*" >&2
    exit 2
}

# read_args FILE: append FILE's flags to the array ARGS, read exactly as pretrain_cocomix.py reads
# examples/quickstart_args.txt (a line whose first non-blank is `#` is a comment; the rest split on blanks, with no
# quoting or globbing), so a flag file means the same to both.
read_args() {
    local line words
    [ -f "$1" ] || die "no flag file $1"
    while IFS= read -r line || [ -n "${line}" ]; do
        [[ "${line}" =~ ^[[:space:]]*# ]] && continue
        read -r -a words <<< "${line}"
        ARGS+=("${words[@]}")
    done < "$1"
}

# flag_value FLAG: the value of FLAG's last occurrence in ARGS, the one argparse keeps.
flag_value() {
    local i value=""
    for ((i = 0; i + 1 < ${#ARGS[@]}; i++)); do
        [ "${ARGS[i]}" != "$1" ] || value="${ARGS[i + 1]}"
    done
    [ -n "${value}" ] || die "$1 is in none of the flag files"
    printf '%s\n' "${value}"
}

# require_var NAME DESCRIPTION: NAME must be set and non-empty.
require_var() {
    local name="$1" description="$2"
    [ -n "${!name:-}" ] || die "${name} is not set: ${description}"
}

# check_data_path "PREFIX" or "W1 PREFIX1 W2 PREFIX2 ...": every prefix has its .bin and .idx.
check_data_path() {
    local token
    for token in $1; do
        if [[ "${token}" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; then
            continue  # a blend weight
        fi
        [ -f "${token}.bin" ] && [ -f "${token}.idx" ] || \
            die "DATA_PATH: no ${token}.bin / ${token}.idx (a --data-path prefix as written by tools/preprocess_data.py, e.g. owt_text_document)"
    done
}

# check_teacher PATH: a local Hugging Face model directory (config.json, weights, tokenizer) or a .gguf file.
check_teacher() {
    local path="$1"
    if [ -d "${path}" ]; then
        [ -f "${path}/config.json" ] || die "TEACHER=${path}: directory without config.json (expected a Hugging Face model directory)"
    elif [ -f "${path}" ]; then
        [[ "${path}" == *.gguf ]] || die "TEACHER=${path}: expected a Hugging Face model directory or a .gguf file"
    else
        die "TEACHER=${path}: no such file or directory"
    fi
}

# pending_input PATH: true in a dry run when PATH is in PENDING_INPUTS (space-separated): an input that an earlier
# stage of examples/pipeline_gpu.sh writes, which cannot exist before that stage has run, so it is not checked.
pending_input() {
    [ -n "${DRY_RUN:-}" ] && [[ " ${PENDING_INPUTS:-} " == *" $1 "* ]]
}

# check_sae PATH: an OpenAI .pt file, or a SAELens / sparsify folder (cfg.json + weights).
check_sae() {
    local path="$1"
    ! pending_input "${path}" || return 0
    if [ -d "${path}" ]; then
        [ -f "${path}/cfg.json" ] || die "SAE=${path}: folder without cfg.json (expected a SAELens or sparsify SAE folder)"
    elif [ ! -f "${path}" ]; then
        die "SAE=${path}: no such file or directory"
    fi
}

# check_concept_labels PREFIX: the .bin/.idx/.json that tools/extract_concepts.py writes.
check_concept_labels() {
    local prefix="$1" suffix
    ! pending_input "${prefix}" || return 0
    for suffix in .bin .idx .json; do
        [ -f "${prefix}${suffix}" ] || die "CONCEPT_LABELS=${prefix}: no ${prefix}${suffix} (write it with EXTRACT_LABELS=1)"
    done
}

# launch PROGRAM ARGS...: run PROGRAM (a Python script of this repository) under the configured launcher.
launch() {
    local program="$1"
    shift
    local launcher="${LAUNCHER:-torchrun}"
    local gpus_per_node="${GPUS_PER_NODE:-8}" nnodes="${NNODES:-1}"
    local master_addr="${MASTER_ADDR:-localhost}" master_port="${MASTER_PORT:-6000}"
    local zero_stage="${ZERO_STAGE:-}"
    local -a cmd optimizer_args
    [ "${launcher}" = deepspeed ] && [ -z "${zero_stage}" ] && zero_stage=1

    case "${launcher}" in
        torchrun)
            cmd=(torchrun --nproc_per_node "${gpus_per_node}" --nnodes "${nnodes}" --max-restarts "${MAX_RESTARTS:-2}")
            if [ "${nnodes}" -eq 1 ]; then
                cmd+=(--master_addr "${master_addr}" --master_port "${master_port}")
            elif [ "${RDZV_BACKEND:-c10d}" = static ]; then
                require_var NODE_RANK "this node's rank, 0 .. NNODES-1 (RDZV_BACKEND=static)"
                cmd+=(--node_rank "${NODE_RANK}" --master_addr "${master_addr}" --master_port "${master_port}")
            else
                cmd+=(--rdzv_backend c10d --rdzv_endpoint "${master_addr}:${master_port}"
                      --rdzv_id "${RDZV_ID:-cocomix}")
            fi
            ;;
        deepspeed)
            cmd=(deepspeed --num_gpus "${gpus_per_node}" --master_port "${master_port}")
            if [ "${nnodes}" -gt 1 ]; then
                require_var HOSTFILE "a DeepSpeed hostfile (one 'hostname slots=N' line per node), see examples/multinode/hostfile.example"
                [ -f "${HOSTFILE}" ] || die "HOSTFILE=${HOSTFILE}: no such file"
                cmd+=(--hostfile "${HOSTFILE}" --num_nodes "${nnodes}" --master_addr "${master_addr}")
                if [ -n "${NO_SSH:-}" ]; then
                    require_var NODE_RANK "this node's rank, 0 .. NNODES-1, in the order of HOSTFILE (NO_SSH=1)"
                    cmd+=(--no_ssh --node_rank "${NODE_RANK}")
                fi
            fi
            ;;
        *)
            die "LAUNCHER=${launcher}: expected torchrun or deepspeed"
            ;;
    esac

    if [ -n "${zero_stage}" ]; then
        local ds_config="${EXAMPLES_DIR}/ds_config_zero${zero_stage}.json"
        [ -f "${ds_config}" ] || die "ZERO_STAGE=${zero_stage}: no ${ds_config} (expected 1, 2 or 3)"
        optimizer_args=(--deepspeed --deepspeed_config "${ds_config}")
    else
        optimizer_args=(--use-distributed-optimizer)
    fi
    # Only the training script takes the optimizer flags.
    [ "$(basename "${program}")" = pretrain_cocomix.py ] || optimizer_args=()

    cmd+=("${REPO_DIR}/${program}" "${optimizer_args[@]}" "$@")
    if [ -n "${DRY_RUN:-}" ]; then
        printf '%q ' "${cmd[@]}"
        printf '\n'
    else
        exec "${cmd[@]}"
    fi
}
