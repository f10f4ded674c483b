#!/usr/bin/env bash
# One srun task = one training rank: map SLURM's task ids to what torch.distributed and DeepSpeed read,
# then exec (no shell stays in between to die on, or swallow, SLURM's USR2/TERM).
set -euo pipefail
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
# Sites that bind one GPU per task (--gpus-per-task=1, --gpu-bind=single:1) leave each task a single
# visible device, which is cuda:0 for it whatever its local rank.
if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != *,* ]]; then
    export LOCAL_RANK=0
fi
exec "$@"
