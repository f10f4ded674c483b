"""Every collective rsmoe calls (DeepSpeed's own aside): the only module that calls torch.distributed's
communication functions (a test walks the package and fails on any other caller).

Tensors go to the group's device before they are reduced and come back on the caller's device:
NCCL groups (CUDA) refuse CPU tensors, gloo groups (CPU) refuse CUDA ones. Outside a process group,
or in a group of one, every function is the identity, so callers never branch on "distributed?".
Reductions return new tensors; the caller's tensor is never modified in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def active(group=None) -> bool:
    """True when `group` (default: the world) has more than one rank."""
    return dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_device(group=None) -> torch.device:
    """Where `group`'s collectives run: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if not active(group):
        return t.clone()
    x = t.detach().to(group_device(group), copy=True)
    dist.all_reduce(x, op=op, group=group)
    return x.to(t.device)


def all_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.SUM, group)


def all_max(t: torch.Tensor, group=None) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.MAX, group)


def all_mean(t: torch.Tensor, group=None) -> torch.Tensor:
    return all_sum(t, group) / world_size(group)


def any_true(flag: bool, group=None) -> bool:
    """True on every rank if it is True on any rank."""
    return bool(all_max(torch.tensor([1.0 if flag else 0.0]), group).item())


def all_gather_cat(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's `t` (same shape everywhere), concatenated along dim 0 in rank order.

    Keeps autograd-free activations where they are (a CUDA tensor over NCCL stays on the GPU)."""
    if not active(group):
        return t
    dev = group_device(group)
    x = t.contiguous().to(dev)
    parts = [torch.empty_like(x) for _ in range(world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts).to(t.device)


def all_gather_object(obj: Any, group=None) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    if not active(group):
        return [obj]
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """`obj` of global rank `src`, on every rank."""
    if not active(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group=None) -> None:
    if active(group):
        dist.barrier(group=group)
