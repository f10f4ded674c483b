#!/usr/bin/env bash
# Stage II (MoE: one fresh LoRA per expert on the merged Stage I LLM) on this machine, one torchrun rank per GPU.
#
#   bash launchers/stage2.sh                                   # reads runs/demo/stage1, writes runs/demo/stage2
#   GPUS=3 CONFIG=rsmoe-1b INIT_FROM=runs/1b/stage1 RUN_DIR=runs/1b/stage2 bash launchers/stage2.sh distributed.ep=3
#
# Environment: as launchers/stage1.sh, plus INIT_FROM (the Stage I run directory; RUN_ROOT/stage1).
# RUN_DIR defaults to RUN_ROOT/stage2. Arguments: dotted overrides for train.py.
set -euo pipefail
RSMOE_PROG=launchers/stage2.sh
RSMOE_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launchers/lib.sh
source "$RSMOE_REPO/launchers/lib.sh"
rsmoe_exec_torchrun 2 "$@"
