#!/usr/bin/env bash
# Stage I (dense: Q-Former + projection + one LoRA) on this machine, one torchrun rank per GPU.
#
#   bash launchers/stage1.sh                                   # demo preset, all visible GPUs
#   GPUS=8 CONFIG=rsmoe-7b DS_CONFIG=ds_configs/zero3.json RUN_DIR=runs/7b/stage1 \
#       bash launchers/stage1.sh data.train_shards='/data/rsicap/train-{000..063}.tar' optim.lr=2e-4
#   DEVICE=cpu GPUS=2 CONFIG=tiny bash launchers/stage1.sh    # 2 gloo ranks on CPU (testing)
#
# Environment: CONFIG (demo) RUN_ROOT (runs/<config>) RUN_DIR (RUN_ROOT/stage1) GPUS (visible GPUs; 1 on CPU)
# DEVICE (auto|cuda|cpu) DS_CONFIG (preset's) NODES/NODE_RANK/MASTER_ADDR/MASTER_PORT (multi-node without
# SLURM) PYTHON (python3). Arguments: dotted overrides for train.py. Rerunning resumes from checkpoints/latest.
set -euo pipefail
RSMOE_PROG=launchers/stage1.sh
RSMOE_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launchers/lib.sh
source "$RSMOE_REPO/launchers/lib.sh"
rsmoe_exec_torchrun 1 "$@"
