"""Launcher detection, process-group setup, and the one object that owns every group.

`ParallelLayout` is the only place that calls `dist.new_group`. Its contract: world = ep * dp;
EP rank `e = rank % ep` holds a contiguous block of n_experts / ep experts; the ranks that hold
the same block form its data-parallel group. All groups are created on all ranks, in the same
order, once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

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


def shutdown_distributed() -> None:
    # Without the barrier + destroy, torch 2.13 + gloo can abort at interpreter exit (SIGABRT).
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


class GroupMPU:
    """The mpu DeepSpeed expects: a data-parallel group and a (trivial) model-parallel group."""

    def __init__(self, dp_group, mp_group):
        self.dp_group, self.mp_group = dp_group, mp_group

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.dp_group)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank


@dataclass
class ParallelLayout:
    """world = ep * dp. Rank r is EP rank r % ep and DP rank r // ep.

    - EP group of r: the ep consecutive ranks that see the same batch (one holds each expert block).
    - Expert-DP group of r: the dp ranks holding the same expert block (gradients reduce there).
    - Data shard of r: its DP rank (all ranks of one EP group read the same data).
    """

    n_experts: int
    ep: int
    world_size: int
    rank: int
    _groups: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.ep < 1 or self.n_experts % self.ep:
            raise ValueError(
                f"{self.n_experts} experts cannot be split over ep={self.ep}: ep must divide the number of experts"
            )
        if self.world_size % self.ep:
            raise ValueError(
                f"world size {self.world_size} is not a multiple of ep={self.ep}: launch ep * dp ranks"
            )

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def local_expert_ids(self, stage: int) -> list[int]:
        if stage == 1:
            return [0]
        per = self.n_experts // self.ep
        return list(range(self.ep_rank * per, (self.ep_rank + 1) * per))

    def build_groups(self) -> None:
        """Create every group, on every rank, in the same order (a collective requirement)."""
        if self._groups or not dist.is_initialized():
            return
        world = list(range(self.world_size))
        self._groups["world"] = dist.group.WORLD
        for e in range(self.ep):
            ranks = world[e :: self.ep]
            g = dist.new_group(ranks)
            if self.rank in ranks:
                self._groups["expert_dp"] = g
        for d in range(self.dp):
            ranks = world[d * self.ep : (d + 1) * self.ep]
            g = dist.new_group(ranks)
            if self.rank in ranks:
                self._groups["ep"] = g
        for r in world:
            g = dist.new_group([r])
            if r == self.rank:
                self._groups["self"] = g

    def group(self, name: str):
        self.build_groups()
        return self._groups[name]

    def mpu(self, stage: int) -> GroupMPU:
        """Stage I (and replicated experts): DP over the world. EP Stage II: DP over the expert group."""
        dp_group = self.group("expert_dp") if (stage == 2 and self.ep_enabled) else self.group("world")
        return GroupMPU(dp_group, self.group("self"))
