"""The process environment of a job: which rank this is (torchrun, deepspeed, srun or none), the
device, and process-group init/shutdown, shared by training and evaluation."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rsmoe.distributed import collectives

log = logging.getLogger(__name__)


@dataclass
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int


def world_info_from_env() -> WorldInfo:
    """torchrun / deepspeed set RANK/LOCAL_RANK/WORLD_SIZE; srun sets SLURM_*; else one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return WorldInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return WorldInfo(0, 0, 1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(backend: str = "auto", port: int | None = None) -> WorldInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA), once."""
    info = world_info_from_env()
    env = os.environ
    # A single process without a launcher: DeepSpeed would otherwise try MPI discovery (mpi4py).
    env.setdefault("RANK", str(info.rank))
    env.setdefault("LOCAL_RANK", str(info.local_rank))
    env.setdefault("WORLD_SIZE", str(info.world_size))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        # A launcher-less single process owns its store: a fixed port would make two such runs on one
        # machine (or a relaunch while the killed run's port lingers) fail with EADDRINUSE.
        env["MASTER_PORT"] = str(port or (_free_port() if info.world_size == 1 else 29500))
    if device_type() == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    if dist.is_initialized():
        return info
    import deepspeed
    import deepspeed.ops

    if device_type() == "cpu":
        # Otherwise init JIT-compiles the shm comm op (~50 s); only inference all-reduce uses it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if backend == "auto":
        backend = "nccl" if device_type() == "cuda" else "gloo"
    if device_type() == "cuda":
        torch.cuda.set_device(info.local_rank)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return info


def init_object_group() -> WorldInfo:
    """Evaluation's world: under a launcher, a gloo group that only carries Python objects (each rank
    runs a plain model; nothing syncs weights), without DeepSpeed. One process: nothing to start."""
    info = world_info_from_env()
    if info.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size)
    return info


def shutdown_distributed(barrier: bool = True) -> None:
    """Leave the process group. `barrier=False` on an error path: a rank that failed must not wait
    for ranks that may be stuck or gone."""
    # Without the destroy (and, on a clean exit, the barrier), torch 2.13 + gloo can abort at
    # interpreter exit (SIGABRT).
    if dist.is_initialized():
        try:
            if barrier:
                collectives.barrier()
        finally:
            dist.destroy_process_group()
