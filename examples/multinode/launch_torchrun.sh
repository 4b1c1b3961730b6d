#!/usr/bin/env bash
# Multi-node training with torchrun: run the SAME command on EVERY node (e.g. with pdsh, or by hand).
#
#   # on each of the 4 nodes:
#   NNODES=4 MASTER_ADDR=node-001 RDZV_ID=cocomix-1.38b \
#   SIZE=1.38b METHOD=cocomix DATA_PATH=... TEACHER=... SAE=... CHECKPOINT_DIR=... \
#       bash examples/multinode/launch_torchrun.sh [extra training flags...]
#
#   NNODES          number of nodes (required)
#   MASTER_ADDR     a host every node can reach (required); MASTER_PORT default 6000
#   RDZV_BACKEND    c10d (default): torchrun's rendezvous at MASTER_ADDR:MASTER_PORT under RDZV_ID assigns the
#                   node ranks (any node may start first; give RDZV_ID a value unique to this run);
#                   static: fixed ranks, then NODE_RANK (0 .. NNODES-1, 0 on MASTER_ADDR) is required
#   GPUS_PER_NODE   default 8
#   MAX_RESTARTS    default 2: when a rank fails, torchrun restarts the whole group (every node) up to this many
#                   times, and it resumes from the last complete checkpoint (--load is --save)
#   SIZE, METHOD    the paper run of examples/pretrain_paper.sh (default 1.38b, cocomix)
#   ZERO_STAGE      unset (default): megatron-core's distributed optimizer; 1/2/3: DeepSpeed ZeRO under torchrun
# Everything else (DATA_PATH, TEACHER, SAE, CHECKPOINT_DIR, TP, PP, MICRO_BATCH_SIZE, ...) is read by
# examples/pretrain_paper.sh. CHECKPOINT_DIR must be on a filesystem shared by all nodes (every rank writes its checkpoint shards).
set -euo pipefail
EXAMPLES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

[ -n "${NNODES:-}" ] || { echo "error: NNODES is not set: the number of nodes" >&2; exit 2; }
[ -n "${MASTER_ADDR:-}" ] || { echo "error: MASTER_ADDR is not set: a host every node can reach (the first node)" >&2; exit 2; }

export LAUNCHER=torchrun
export NNODES MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-6000}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
export SIZE="${SIZE:-1.38b}" METHOD="${METHOD:-cocomix}"
export RDZV_ID="${RDZV_ID:-${METHOD}-${SIZE}}"
exec bash "${EXAMPLES_DIR}/pretrain_paper.sh" "$@"
