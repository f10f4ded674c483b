"""The one object that owns every process group.

`ParallelLayout` is the only place that creates process groups: one torch `DeviceMesh` of shape
(dp, ep, 1). Its contract: world = ep * dp; EP rank `e = rank % ep` holds a contiguous block of
n_experts / ep experts; the ranks that hold the same block form its data-parallel group (the mesh's
"dp" dimension), the ep consecutive ranks that read the same batch its EP group ("ep"), and the
size-1 last dimension gives every rank its own group ("self"). Created on all ranks, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.distributed as dist

from rsmoe.config import check_expert_parallel
from rsmoe.distributed.env import device_type

log = logging.getLogger(__name__)


class GroupMPU:
    """The mpu DeepSpeed expects.

    - data-parallel group: gradients are averaged and ZeRO partitions over it.
    - model-parallel group (`norm_group`): the ranks that together hold one whole model. DeepSpeed's
      ZeRO-1/2/3 grad-norm sums the squared norm over it (`_model_parallel_all_reduce`), so clipping
      uses the norm of the whole model. Under expert parallelism it is the EP group (each EP rank holds
      other experts' adapters); otherwise the rank's own size-1 group (a no-op).
    - reported model-parallel size/rank stay 1/0: with a larger size DeepSpeed would name and load
      checkpoint files as tensor-parallel shards; each EP rank writes its own directory instead.
      At rank 0 every local parameter counts in the norm, which is right: EP ranks hold disjoint
      trainable parameters (replicated trainable parameters are refused under EP).
    - tensor-parallel accessors: the size-1 group; nothing is split inside a tensor.
    """

    def __init__(self, dp_group, self_group, norm_group=None):
        self.dp_group, self.self_group = dp_group, self_group
        self.norm_group = norm_group if norm_group is not None else self_group

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.dp_group)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    def get_model_parallel_group(self):
        return self.norm_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_group(self):
        return self.self_group

    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank


@dataclass
class ParallelLayout:
    """world = ep * dp. Rank r is EP rank r % ep and DP rank r // ep.

    - EP group of r: the ep consecutive ranks that see the same batch (one holds each expert block).
    - Expert-DP group of r: the dp ranks holding the same expert block (gradients reduce there).
    - Data shard of r: its DP rank (all ranks of one EP group read the same data).

    Construction validates the layout (cheap, before any model is built); `build_groups` creates
    every group once, on every rank, in the same order. Nothing else in rsmoe creates groups.
    """

    n_experts: int
    ep: int
    world_size: int
    rank: int
    _groups: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_expert_parallel(self.n_experts, self.ep, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

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

    @property
    def experts_per_rank(self) -> int:
        return self.n_experts // self.ep

    def expert_block(self, ep_rank: int) -> list[int]:
        """Global expert ids held by EP rank `ep_rank` (a contiguous block, so EP order = expert order)."""
        per = self.experts_per_rank
        return list(range(ep_rank * per, (ep_rank + 1) * per))

    def local_expert_ids(self, stage: int) -> list[int]:
        if stage == 1:
            return [0]
        return self.expert_block(self.ep_rank)

    def expert_dp_ranks(self, ep_rank: int) -> list[int]:
        return list(range(ep_rank, self.world_size, self.ep))

    def ep_group_ranks(self, dp_rank: int) -> list[int]:
        return list(range(dp_rank * self.ep, (dp_rank + 1) * self.ep))

    def build_groups(self) -> None:
        """Create every group, on every rank, in the same order (a collective requirement)."""
        if self._groups or not dist.is_initialized():
            return
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(
                f"layout built for rank {self.rank}/{self.world_size} but this process is "
                f"rank {dist.get_rank()}/{dist.get_world_size()}"
            )
        from torch.distributed.device_mesh import init_device_mesh

        # Row-major (dp, ep, 1): rank r sits at (r // ep, r % ep, 0), i.e. (dp_rank, ep_rank, 0).
        mesh = init_device_mesh(device_type(), (self.dp, self.ep, 1), mesh_dim_names=("dp", "ep", "self"))
        self._groups = {"world": dist.group.WORLD, "expert_dp": mesh.get_group("dp"), "ep": mesh.get_group("ep"),
                        "self": mesh.get_group("self")}
        got = {n: dist.get_process_group_ranks(self._groups[n]) for n in ("expert_dp", "ep")}
        want = {"expert_dp": self.expert_dp_ranks(self.ep_rank), "ep": self.ep_group_ranks(self.dp_rank)}
        if got != want:  # the layout's contract, checked once against the mesh torch built
            raise RuntimeError(f"device mesh groups {got} differ from the layout's {want}")

    def group(self, name: str):
        """'world', 'expert_dp', 'ep' or 'self' (this rank alone)."""
        self.build_groups()
        return self._groups[name]

    def mpu(self, stage: int) -> GroupMPU:
        """Stage I (and replicated experts): DP over the world. EP Stage II: DP over the expert group,
        gradient norm over the EP group (clipping sees every expert, as in one process)."""
        if stage == 2 and self.ep_enabled:
            return GroupMPU(self.group("expert_dp"), self.group("self"), norm_group=self.group("ep"))
        return GroupMPU(self.group("world"), self.group("self"))
