#!/usr/bin/env bash
# The whole recipe on this machine: Stage I -> Stage II -> `rsmoe eval` on held-out shards.
#
#   CONFIG=demo bash launchers/pipeline.sh                      # runs/demo/{stage1,stage2}, then eval
#   GPUS=4 CONFIG=rsmoe-1b RUN_ROOT=runs/1b EVAL_SHARDS='/data/rsieval/test-*.tar' \
#       bash launchers/pipeline.sh data.train_shards='/data/rsicap/train-*.tar'
#   DEVICE=cpu GPUS=2 CONFIG=tiny bash launchers/pipeline.sh train.steps=4    # CPU check, two gloo ranks
#
# Environment: everything launchers/stage1.sh reads, with RUN_ROOT instead of RUN_DIR (stages go to
# RUN_ROOT/stage1 and RUN_ROOT/stage2), plus STAGE1_OVERRIDES / STAGE2_OVERRIDES (space-separated
# dotted overrides for one stage only), EVAL_SHARDS (data/shards/sample/test-*.tar), EVAL_ARGS (extra
# `rsmoe eval` options). Arguments: dotted overrides for both stages. Rerunning resumes where it stopped.
set -euo pipefail
RSMOE_PROG=launchers/pipeline.sh
RSMOE_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launchers/lib.sh
source "$RSMOE_REPO/launchers/lib.sh"

if [[ -n ${RUN_DIR:-} || -n ${INIT_FROM:-} ]]; then
    rsmoe_die "pipeline.sh places the stages under RUN_ROOT (RUN_ROOT/stage1, RUN_ROOT/stage2); unset RUN_DIR and INIT_FROM and set RUN_ROOT"
fi
if [[ ${NODES:-1} != 1 ]]; then
    rsmoe_die "pipeline.sh runs on one machine (NODES=${NODES}); on a cluster use slurm/submit_pipeline.sh, or run launchers/stage1.sh and stage2.sh on every node"
fi
rsmoe_common_env
export CONFIG RUN_ROOT PYTHON DEVICE GPUS
EVAL_SHARDS=${EVAL_SHARDS:-data/shards/sample/test-*.tar}
read -ra stage1_extra <<<"${STAGE1_OVERRIDES:-}"
read -ra stage2_extra <<<"${STAGE2_OVERRIDES:-}"
read -ra eval_extra <<<"${EVAL_ARGS:-}"

# run_stage N [overrides...]: train one stage; stop the pipeline unless it reached its last step.
run_stage() {
    local n=$1 marker rc=0
    shift
    export RUN_DIR=$RUN_ROOT/stage$n
    marker=$(rsmoe_start_marker "$RUN_DIR" "pipeline-$$")
    rsmoe_run_forwarding bash "$RSMOE_REPO/launchers/stage$n.sh" "$@" || rc=$?
    if ((rc != 0)); then
        rsmoe_note "stage $n exited with status $rc (latest checkpoint: $(rsmoe_latest_checkpoint "$RUN_DIR")); logs in $RUN_DIR/logs; rerun this command to resume"
        exit "$rc"
    fi
    if ! rsmoe_finished "$RUN_DIR" "$marker"; then
        rsmoe_note "stage $n stopped before its last step (preemption signal or train.stop_after_steps); latest checkpoint: $(rsmoe_latest_checkpoint "$RUN_DIR"); rerun this command to resume"
        exit 3
    fi
    rm -f "$marker"
    unset RUN_DIR
}

run_stage 1 "$@" "${stage1_extra[@]}"
INIT_FROM=$RUN_ROOT/stage1 run_stage 2 "$@" "${stage2_extra[@]}"

# Evaluation (one rank per GPU, each scoring a share of the samples); an older install may lack it.
if ! rsmoe_eval_available; then
    rsmoe_note "skipping evaluation: 'rsmoe eval' is not available in this installation; the model is in $RUN_ROOT/stage2/final"
    exit 0
fi
rsmoe_note "evaluating $RUN_ROOT/stage2 on $EVAL_SHARDS with $GPUS rank(s) (report: $RUN_ROOT/stage2/eval/)"
rsmoe_run_forwarding "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" \
    -m rsmoe.cli eval --model "$RUN_ROOT/stage2" --shards "$EVAL_SHARDS" "${eval_extra[@]}"
rsmoe_note "done: Stage I $RUN_ROOT/stage1/final, Stage II $RUN_ROOT/stage2/final, eval $RUN_ROOT/stage2/eval; TensorBoard: tensorboard --logdir $RUN_ROOT"
