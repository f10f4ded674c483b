# shellcheck shell=bash
# SLURM side of the launchers: sourced by slurm/*.sbatch inside the job. See docs/cluster.md.
#
# Launch model: one SLURM task per GPU, started by `srun` on every node, each task exec'ing train.py
# (slurm/rank_env.sh maps SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to RANK/LOCAL_RANK/WORLD_SIZE).
# No torchrun and no deepspeed launcher in between: nothing needs ssh/pdsh, and `--signal=USR2@120`
# (no "B:") reaches every rank straight from slurmstepd, with no intermediate process that could die
# on USR2 or SIGKILL the ranks after its own short grace period while they write the checkpoint.

# shellcheck source=launchers/lib.sh
source "$RSMOE_REPO/launchers/lib.sh"

rsmoe_slurm_common() {
    [[ -n ${SLURM_JOB_ID:-} ]] || rsmoe_die "not inside a SLURM job: submit it with sbatch (on one machine use launchers/*.sh)"
    # Ranks per node = tasks per node ("4(x2)" -> 4); checked against the GPUs SLURM gave this node.
    local per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
    GPUS=${per_node%%[(,]*}
    RSMOE_GPUS_HINT="request one GPU per task (--gpus-per-node equal to --ntasks-per-node)"
    rsmoe_common_env
    # srun does not inherit --cpus-per-task from sbatch since SLURM 22.05.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    fi
    # Rendezvous: rank 0 runs on the first node of the allocation.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    [[ -n $MASTER_ADDR ]] || rsmoe_die "could not read the first host of SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}' with scontrol"
    # A port per job id: two jobs sharing a node do not collide. Override with MASTER_PORT.
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
}

# rsmoe_slurm_train STAGE [dotted overrides...]
rsmoe_slurm_train() {
    local stage=$1 marker rc=0
    shift
    rsmoe_slurm_common
    rsmoe_train_args "$stage"
    marker=$(rsmoe_start_marker "$RUN_DIR" "job$SLURM_JOB_ID")
    rsmoe_note "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: stage $stage, ${SLURM_NTASKS:-1} $DEVICE rank(s), master $MASTER_ADDR:$MASTER_PORT, $RUN_DIR, resuming from: $(rsmoe_latest_checkpoint "$RUN_DIR")"
    local -a srun_extra
    read -ra srun_extra <<<"${SRUN_ARGS:-}"
    srun --kill-on-bad-exit=1 "${srun_extra[@]}" "$RSMOE_REPO/slurm/rank_env.sh" \
        "$PYTHON" -u "$RSMOE_REPO/train.py" "${RSMOE_TRAIN_ARGS[@]}" "$@" || rc=$?
    if ((rc != 0)); then
        rsmoe_note "training failed with status $rc; rank logs: $RUN_DIR/logs/train_rank*.log; latest checkpoint: $(rsmoe_latest_checkpoint "$RUN_DIR")"
        exit "$rc"
    fi
    if ! rsmoe_finished "$RUN_DIR" "$marker"; then
        # Not success: an afterok dependent (Stage II, eval) must not start on an unfinished stage.
        rsmoe_note "stage $stage stopped before its last step at $(rsmoe_latest_checkpoint "$RUN_DIR") (preemption signal or train.stop_after_steps); rank 0 asked SLURM to requeue job $SLURM_JOB_ID, which resumes from there; if the requeue failed (see the log above), resubmit the same command"
        exit 3
    fi
    rm -f "$marker"
    rsmoe_note "stage $stage finished: $RUN_DIR/final"
}

# rsmoe_slurm_eval [extra rsmoe eval options...]: MODEL (RUN_ROOT/stage2), EVAL_SHARDS, EVAL_ARGS.
# One rank per task, like training; each scores a share of the samples and rank 0 writes the report.
rsmoe_slurm_eval() {
    rsmoe_slurm_common
    local model=${MODEL:-$RUN_ROOT/stage2}
    local shards=${EVAL_SHARDS:-data/shards/sample/test-*.tar}
    rsmoe_eval_available || rsmoe_die "'rsmoe eval' is not available in this installation ($PYTHON); update rsmoe"
    local -a eval_extra srun_extra
    read -ra eval_extra <<<"${EVAL_ARGS:-}"
    read -ra srun_extra <<<"${SRUN_ARGS:-}"
    rsmoe_note "job $SLURM_JOB_ID: evaluating $model on $shards with ${SLURM_NTASKS:-1} rank(s)"
    srun --kill-on-bad-exit=1 "${srun_extra[@]}" "$RSMOE_REPO/slurm/rank_env.sh" \
        "$PYTHON" -u -m rsmoe.cli eval --model "$model" --shards "$shards" "${eval_extra[@]}" "$@"
}
