#!/usr/bin/env bash
# Submit the whole recipe as three chained SLURM jobs: Stage I -> Stage II -> eval.
# Each job starts only if the previous one finished (--dependency=afterok); a preempted stage is
# requeued under the same job id, so the chain simply waits for it.
#
#   NODES=2 GPUS=4 CONFIG=rsmoe-1b RUN_ROOT=/scratch/$USER/rsmoe-1b PARTITION=gpu \
#       EVAL_SHARDS='/data/rsieval/test-*.tar' \
#       bash slurm/submit_pipeline.sh data.train_shards='/data/rsicap/train-*.tar'
#
# Environment: CONFIG (demo) RUN_ROOT (runs/<config>) NODES (1) GPUS (GPUs per node = ranks per node, 4)
# CPUS_PER_TASK (8) DEVICE (cuda; cpu requests no GPUs) TIME_STAGE1/TIME_STAGE2 (24:00:00) TIME_EVAL
# (04:00:00) PARTITION ACCOUNT QOS SBATCH_ARGS (extra sbatch options, space-separated) DS_CONFIG
# STAGE1_OVERRIDES STAGE2_OVERRIDES EVAL_SHARDS EVAL_ARGS EVAL (1; 0 skips the eval job) PYTHON
# DRY_RUN (1 prints the sbatch commands only). Arguments: dotted overrides for both stages.
set -euo pipefail
RSMOE_PROG=slurm/submit_pipeline.sh
RSMOE_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launchers/lib.sh
source "$RSMOE_REPO/launchers/lib.sh"

DRY_RUN=${DRY_RUN:-0}
if [[ $DRY_RUN != 1 ]] && ! command -v sbatch >/dev/null 2>&1; then
    rsmoe_die "sbatch not found: run this on a SLURM login node (DRY_RUN=1 prints the commands instead)"
fi
CONFIG=${CONFIG:-demo}
NAME=$(rsmoe_config_name "$CONFIG")
RUN_ROOT=${RUN_ROOT:-runs/$NAME}
NODES=${NODES:-1}
GPUS=${GPUS:-4}
CPUS_PER_TASK=${CPUS_PER_TASK:-8}
DEVICE=${DEVICE:-cuda}
rsmoe_positive_int NODES "$NODES" "set NODES to the number of nodes per training job"
rsmoe_positive_int GPUS "$GPUS" "set GPUS to the GPUs (= ranks) per node"
rsmoe_positive_int CPUS_PER_TASK "$CPUS_PER_TASK" "set CPUS_PER_TASK to the CPU cores per rank"
[[ $DEVICE == cuda || $DEVICE == cpu ]] || rsmoe_die "DEVICE='$DEVICE' is not cuda or cpu"
if [[ -n ${DS_CONFIG:-} && ! -f $DS_CONFIG ]]; then
    rsmoe_die "DS_CONFIG='$DS_CONFIG' not found; use one of ds_configs/zero2.json, zero3.json, zero3_offload.json"
fi
if [[ -n ${RUN_DIR:-} || -n ${INIT_FROM:-} ]]; then
    rsmoe_die "submit_pipeline.sh places the stages under RUN_ROOT (RUN_ROOT/stage1, RUN_ROOT/stage2); unset RUN_DIR and INIT_FROM and set RUN_ROOT"
fi
# SLURM does not create the --output directory; the jobs start in this directory, but absolute
# paths make the printed commands copy-pasteable from anywhere.
mkdir -p "$RUN_ROOT/stage1/logs" "$RUN_ROOT/stage2/logs"
RUN_ROOT=$(cd "$RUN_ROOT" && pwd)
read -ra stage1_extra <<<"${STAGE1_OVERRIDES:-}"
read -ra stage2_extra <<<"${STAGE2_OVERRIDES:-}"
read -ra sbatch_extra <<<"${SBATCH_ARGS:-}"

# --export=ALL: the jobs read CONFIG, RUN_DIR, ... from this environment even where a site sets
# SBATCH_EXPORT=NONE. --kill-on-invalid-dep: a failed stage cancels its dependents instead of
# leaving them pending forever.
common=(--parsable --export=ALL --kill-on-invalid-dep=yes)
[[ -n ${PARTITION:-} ]] && common+=(--partition "$PARTITION")
[[ -n ${ACCOUNT:-} ]] && common+=(--account "$ACCOUNT")
[[ -n ${QOS:-} ]] && common+=(--qos "$QOS")
common+=("${sbatch_extra[@]}")
train_res=(--nodes "$NODES" --ntasks-per-node "$GPUS" --cpus-per-task "$CPUS_PER_TASK")
eval_res=(--nodes 1 --ntasks-per-node "$GPUS" --cpus-per-task "$CPUS_PER_TASK")
if [[ $DEVICE == cuda ]]; then
    train_res+=(--gpus-per-node "$GPUS")
    eval_res+=(--gpus-per-node "$GPUS")
else
    train_res+=(--gpus-per-node 0)
    eval_res+=(--gpus-per-node 0)
fi

# submit LABEL SBATCH_ARGS... -> prints the job id (DRY_RUN: prints the command, returns "dry-LABEL")
submit() {
    local label=$1
    shift
    if [[ $DRY_RUN == 1 ]]; then
        {
            printf 'sbatch'
            printf ' %q' "$@"
            printf '\n'
        } >&2
        echo "dry-$label"
        return
    fi
    local out
    out=$(sbatch "$@") || rsmoe_die "sbatch failed (see its message above): sbatch $*"
    out=${out%%;*} # --parsable prints "jobid" or "jobid;cluster"
    [[ $out =~ ^[0-9]+$ ]] || rsmoe_die "sbatch printed '$out' instead of a job id"
    echo "$out"
}

export RSMOE_REPO CONFIG RUN_ROOT DEVICE
[[ -n ${DS_CONFIG:-} ]] && export DS_CONFIG
jid1=$(RUN_DIR=$RUN_ROOT/stage1 submit stage1 "${common[@]}" "${train_res[@]}" --job-name "rsmoe-$NAME-stage1" \
    --time "${TIME_STAGE1:-24:00:00}" --output "$RUN_ROOT/stage1/logs/slurm-%j.out" \
    "$RSMOE_REPO/slurm/stage1.sbatch" "$@" "${stage1_extra[@]}")
jid2=$(RUN_DIR=$RUN_ROOT/stage2 INIT_FROM=$RUN_ROOT/stage1 submit stage2 "${common[@]}" "${train_res[@]}" \
    --dependency "afterok:$jid1" --job-name "rsmoe-$NAME-stage2" --time "${TIME_STAGE2:-24:00:00}" \
    --output "$RUN_ROOT/stage2/logs/slurm-%j.out" "$RSMOE_REPO/slurm/stage2.sbatch" "$@" "${stage2_extra[@]}")
rsmoe_note "Stage I: job $jid1 -> $RUN_ROOT/stage1 (log $RUN_ROOT/stage1/logs/slurm-$jid1.out)"
rsmoe_note "Stage II: job $jid2 after $jid1 -> $RUN_ROOT/stage2 (log $RUN_ROOT/stage2/logs/slurm-$jid2.out)"

jid3=""
if [[ ${EVAL:-1} == 1 ]]; then
    PYTHON=${PYTHON:-python3}
    if ! PYTHONPATH="$RSMOE_REPO${PYTHONPATH:+:$PYTHONPATH}" rsmoe_eval_available; then
        rsmoe_note "no eval job: 'rsmoe eval' is not available in this installation ($PYTHON); evaluate $RUN_ROOT/stage2 later"
    else
        if [[ -z ${EVAL_SHARDS:-} ]]; then
            EVAL_SHARDS="$RSMOE_REPO/data/shards/sample/test-*.tar"
            rsmoe_note "EVAL_SHARDS not set: evaluating on the bundled sample ($EVAL_SHARDS)"
        fi
        export EVAL_SHARDS
        [[ -n ${EVAL_ARGS:-} ]] && export EVAL_ARGS
        jid3=$(MODEL=$RUN_ROOT/stage2 submit eval "${common[@]}" "${eval_res[@]}" --dependency "afterok:$jid2" \
            --job-name "rsmoe-$NAME-eval" --time "${TIME_EVAL:-04:00:00}" \
            --output "$RUN_ROOT/stage2/logs/eval-%j.out" "$RSMOE_REPO/slurm/eval.sbatch")
        rsmoe_note "eval: job $jid3 after $jid2 (log $RUN_ROOT/stage2/logs/eval-$jid3.out)"
    fi
fi
rsmoe_note "watch: squeue --me; tail -f $RUN_ROOT/stage1/logs/slurm-$jid1.out; tensorboard --logdir $RUN_ROOT --bind_all"
echo "$jid1 $jid2${jid3:+ $jid3}"
