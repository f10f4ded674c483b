"""Parallel training strategies on top of rsmoe.distributed.ParallelLayout (which owns the groups)."""

from rsmoe.parallel.expert_parallel import ExpertParallel, SlicedVisualPrefix

__all__ = ["ExpertParallel", "SlicedVisualPrefix"]
