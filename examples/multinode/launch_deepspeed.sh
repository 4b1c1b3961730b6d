#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher: run ONCE, on the first host of the hostfile (the launcher
# starts the other nodes over ssh, with pdsh), or, with NO_SSH=1, on EVERY node with its NODE_RANK.
#
#   HOSTFILE=examples/multinode/hostfile.example NNODES=4 \
#   SIZE=1.38b METHOD=cocomix DATA_PATH=... TEACHER=... SAE=... CHECKPOINT_DIR=... \
#       bash examples/multinode/launch_deepspeed.sh [extra training flags...]
#
#   HOSTFILE        DeepSpeed hostfile (`hostname slots=N` per line); see hostfile.example
#   NNODES          nodes to use from it (default: the number of host lines)
#   NO_SSH=1        no ssh: each node runs this script itself with NODE_RANK (0 .. NNODES-1, the hostfile's order)
#                   and MASTER_ADDR set to the first node's address (DeepSpeed's --no_ssh --node_rank)
#   GPUS_PER_NODE   default 8
#   SIZE, METHOD    the paper run of examples/pretrain_paper.sh (default 1.38b, cocomix)
#   MASTER_ADDR     default: the first host of the hostfile; MASTER_PORT default 6000
#   ZERO_STAGE      DeepSpeed ZeRO stage, 1 (default), 2 or 3 (2 and 3 need PP=1); examples/ds_config_zero*.json
# Everything else (DATA_PATH, TEACHER, SAE, CHECKPOINT_DIR, TP, PP, MICRO_BATCH_SIZE, ...) is read by
# examples/pretrain_paper.sh. Paths must be valid on every node (shared filesystem). The global batch stays the paper's (512 or
# 1024 sequences): more nodes mean fewer gradient-accumulation micro-batches per step, not a larger batch.
set -euo pipefail
EXAMPLES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

[ -n "${HOSTFILE:-}" ] || { echo "error: HOSTFILE is not set: a DeepSpeed hostfile, see examples/multinode/hostfile.example" >&2; exit 2; }
[ -f "${HOSTFILE}" ] || { echo "error: HOSTFILE=${HOSTFILE}: no such file" >&2; exit 2; }
HOSTS=($(grep -v '^\s*#' "${HOSTFILE}" | awk 'NF {print $1}'))
[ "${#HOSTS[@]}" -gt 0 ] || { echo "error: HOSTFILE=${HOSTFILE}: no hosts in it" >&2; exit 2; }

export LAUNCHER=deepspeed
export HOSTFILE
export NNODES="${NNODES:-${#HOSTS[@]}}"
export MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
export MASTER_PORT="${MASTER_PORT:-6000}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export ZERO_STAGE="${ZERO_STAGE:-1}"
export SIZE="${SIZE:-1.38b}" METHOD="${METHOD:-cocomix}"
exec bash "${EXAMPLES_DIR}/pretrain_paper.sh" "$@"
