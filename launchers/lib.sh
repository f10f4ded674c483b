# shellcheck shell=bash
# Shared by launchers/*.sh and slurm/*: settings from environment variables, device detection,
# the CPU fallback, input checks with one clear error line, and the "did the stage finish" test.
# Sourced, not run. Callers set RSMOE_PROG (the name used in messages) and RSMOE_REPO.

rsmoe_die() {
    echo "${RSMOE_PROG:-rsmoe}: error: $*" >&2
    exit 2
}

rsmoe_note() {
    echo "${RSMOE_PROG:-rsmoe}: $*" >&2
}

# rsmoe_positive_int NAME VALUE HINT
rsmoe_positive_int() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || rsmoe_die "$1='$2' is not a positive integer; $3"
}

# Number of GPUs this process may use: CUDA_VISIBLE_DEVICES when set (empty or -1: none), else nvidia-smi.
rsmoe_visible_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        if [[ -z $CUDA_VISIBLE_DEVICES || $CUDA_VISIBLE_DEVICES == -1 ]]; then
            echo 0
            return
        fi
        local -a ids
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
        return
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# Preset name (tiny, demo, rsmoe-7b) or YAML path -> a short name for default run directories.
rsmoe_config_name() {
    local name=${1##*/}
    name=${name%.yaml}
    echo "${name%.yml}"
}

# Settings every entry point shares. Reads (all optional):
#   CONFIG (demo) RUN_ROOT (runs/<config name>) DEVICE (auto|cuda|cpu) GPUS (ranks per node)
#   PYTHON (python3) DS_CONFIG (the preset's) and the HF offline switches (default on).
rsmoe_common_env() {
    CONFIG=${CONFIG:-demo}
    RUN_ROOT=${RUN_ROOT:-runs/$(rsmoe_config_name "$CONFIG")}
    PYTHON=${PYTHON:-python3}
    command -v "$PYTHON" >/dev/null 2>&1 || rsmoe_die "PYTHON='$PYTHON' not found; activate the environment with rsmoe installed or set PYTHON=/path/to/python"
    # The checkout's train.py imports rsmoe from the checkout; `python -m rsmoe.cli` must find the same one.
    export PYTHONPATH="$RSMOE_REPO${PYTHONPATH:+:$PYTHONPATH}"

    local visible
    visible=$(rsmoe_visible_gpus)
    DEVICE=${DEVICE:-auto}
    if [[ $DEVICE == auto ]]; then
        if ((visible > 0)); then DEVICE=cuda; else DEVICE=cpu; fi
    fi
    case $DEVICE in
        cuda)
            ((visible > 0)) || rsmoe_die "DEVICE=cuda but no GPU is visible (nvidia-smi / CUDA_VISIBLE_DEVICES); use DEVICE=cpu to run on CPU"
            GPUS=${GPUS:-$visible}
            ;;
        cpu)
            GPUS=${GPUS:-1}
            # CPU ranks: gloo, no CUDA probing, one thread per rank so N ranks do not oversubscribe the cores.
            export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
            export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
            ;;
        *) rsmoe_die "DEVICE='$DEVICE' is not one of auto, cuda, cpu" ;;
    esac
    rsmoe_positive_int GPUS "$GPUS" "set GPUS to the number of ranks per node (GPUs, or CPU processes with DEVICE=cpu)"
    if [[ $DEVICE == cuda ]] && ((GPUS > visible)); then
        rsmoe_die "GPUS=$GPUS: $GPUS ranks per node but only $visible GPU(s) are visible on $(hostname); ${RSMOE_GPUS_HINT:-lower GPUS}"
    fi
    if [[ -n ${DS_CONFIG:-} && ! -f $DS_CONFIG ]]; then
        rsmoe_die "DS_CONFIG='$DS_CONFIG' not found; use one of ds_configs/zero2.json, zero3.json, zero3_offload.json"
    fi

    # Compute nodes often have no internet: never try the Hub; weights come from local paths.
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
    export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
}

# rsmoe_train_args STAGE -> fills the array RSMOE_TRAIN_ARGS (train.py options for this stage).
# Reads RUN_DIR (RUN_ROOT/stageN), INIT_FROM (Stage II: RUN_ROOT/stage1), CONFIG, DS_CONFIG, and
# STAGE2_INIT=untrained (Stage II without a Stage I run: the one-stage ablation arm; INIT_FROM unused).
rsmoe_train_args() {
    local stage=$1
    RUN_DIR=${RUN_DIR:-$RUN_ROOT/stage$stage}
    RSMOE_TRAIN_ARGS=(--config "$CONFIG" --stage "$stage" --run-dir "$RUN_DIR")
    if ((stage == 2)) && [[ ${STAGE2_INIT:-stage1} == untrained ]]; then
        [[ -z ${INIT_FROM:-} ]] || rsmoe_die "STAGE2_INIT=untrained starts Stage II without a Stage I run, but INIT_FROM='$INIT_FROM' is set; unset one of them"
        RSMOE_TRAIN_ARGS+=(stage2_init=untrained)
    elif ((stage == 2)); then
        INIT_FROM=${INIT_FROM:-$RUN_ROOT/stage1}
        if [[ ! -f $INIT_FROM/final/visual.safetensors && ! -f $INIT_FROM/visual.safetensors ]]; then
            rsmoe_die "Stage II needs a finished Stage I run: '$INIT_FROM' has no final/visual.safetensors; run Stage I to the end first or set INIT_FROM=<stage1 run dir>"
        fi
        RSMOE_TRAIN_ARGS+=(--init-from "$INIT_FROM")
    fi
    if [[ -n ${DS_CONFIG:-} ]]; then
        RSMOE_TRAIN_ARGS+=(--deepspeed "$DS_CONFIG")
    fi
}

# rsmoe_start_marker RUN_DIR ID -> prints the path of a fresh marker file; rsmoe_finished compares it
# with final/config.yaml, which train.py writes only after the last step (an earlier run's final/ is older);
# final/INCOMPLETE is there until the last file of final/ is written (a run killed mid-export is not finished).
rsmoe_start_marker() {
    mkdir -p "$1/logs"
    local marker="$1/logs/.started-$2"
    touch "$marker"
    echo "$marker"
}

rsmoe_finished() {
    [[ $1/final/config.yaml -nt $2 && ! -e $1/final/INCOMPLETE ]]
}

# True when this installation has `rsmoe eval` (checked by file, without importing torch & co.).
rsmoe_eval_available() {
    "$PYTHON" - <<'PY' 2>/dev/null
import importlib.util, os, sys
from rsmoe.cli import COMMANDS
parent, _, leaf = COMMANDS["eval"][0].rpartition(".")
spec = importlib.util.find_spec(parent)
paths = spec.submodule_search_locations if spec else []
sys.exit(0 if any(os.path.exists(os.path.join(p, leaf + ".py")) or os.path.isdir(os.path.join(p, leaf)) for p in paths) else 1)
PY
}

rsmoe_latest_checkpoint() {
    if [[ -f $1/checkpoints/latest ]]; then
        echo "$1/checkpoints/$(<"$1/checkpoints/latest")"
    else
        echo "none"
    fi
}

# rsmoe_exec_torchrun STAGE [dotted overrides...]: one node (or NODES>1 without SLURM), torchrun.
# Replaces the shell (exec), so `kill -TERM <launcher pid>` reaches torchrun itself.
# torchrun rather than the `deepspeed` launcher: no ssh/pdsh/hostfile, no --local_rank argument, and it
# forwards SIGTERM/SIGUSR2 to the ranks with a grace period we control (the deepspeed launcher kills
# its children 30 s after SIGTERM and dies on SIGUSR2), so a preempted run still writes its checkpoint.
rsmoe_exec_torchrun() {
    local stage=$1
    shift
    rsmoe_common_env
    rsmoe_train_args "$stage"
    NODES=${NODES:-1}
    rsmoe_positive_int NODES "$NODES" "set NODES to the number of machines (1 on a workstation)"
    local -a rdzv
    if ((NODES == 1)) && [[ -z ${MASTER_PORT:-} ]]; then
        rdzv=(--standalone) # a free local port: several runs can share a machine
    else
        # Several nodes without SLURM: run the same command on every node with its NODE_RANK.
        if ((NODES > 1)) && [[ -z ${MASTER_ADDR:-} || -z ${NODE_RANK:-} ]]; then
            rsmoe_die "NODES=$NODES needs MASTER_ADDR (node 0's address) and NODE_RANK (0..$((NODES - 1))) on every node; under SLURM use slurm/stage$stage.sbatch"
        fi
        rdzv=(--nnodes "$NODES" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
    fi
    # torchrun forwards these signals to the ranks and waits this long before SIGKILL. Without
    # SIGUSR2 in the list, USR2 kills torchrun itself and leaves the ranks running unsupervised.
    # (PET_* are torchrun's --signals-to-handle/--shutdown-timeout; TORCHELASTIC_SIGNALS_TO_HANDLE is
    # overwritten by torchrun from that option.)
    export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2}
    export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-600}
    unset RANK LOCAL_RANK WORLD_SIZE
    rsmoe_note "stage $stage: $NODES node(s) x $GPUS $DEVICE rank(s), config $CONFIG -> $RUN_DIR (resumes from checkpoints/latest if present)"
    exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$GPUS" \
        "$RSMOE_REPO/train.py" "${RSMOE_TRAIN_ARGS[@]}" "$@"
}

# rsmoe_run_forwarding CMD...: run CMD as a child and pass TERM/INT/HUP/USR2 on to it (a shell waiting
# on a foreground child would otherwise die on them and leave the child running unaware).
rsmoe_run_forwarding() {
    "$@" &
    local child=$! sig rc=0
    for sig in TERM INT HUP USR2; do
        # shellcheck disable=SC2064 # expand child and sig now
        trap "kill -s $sig $child 2>/dev/null || true" "$sig"
    done
    while true; do
        wait "$child" && rc=0 || rc=$?
        # A trapped signal interrupts `wait` (status > 128) while the child still runs: wait again.
        kill -0 "$child" 2>/dev/null || break
    done
    trap - TERM INT HUP USR2
    return "$rc"
}
