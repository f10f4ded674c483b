"""Fault injection for the reliability tests (a testing aid; inert unless RSMOE_FAULT is set).

`RSMOE_FAULT` holds `;`-separated specs `ACTION:POINT:STEPS[:RANKS]`:

    nan:loss:3,4          the loss of steps 3 and 4 becomes NaN (every micro-batch, every rank)
    inf:loss:5:1          the loss of step 5 becomes +inf on rank 1 only
    hang:after_step:5     after optimizer step 5, sleep until killed (a test then sends SIGKILL)
    hang:before_complete:4  inside checkpoint save of step 4: all state files written, COMPLETE not yet
    exit:before_complete:4  same place, but the process dies at once (os._exit, like a node loss)
    exit:in_export:6      while writing final/ of a 6-step run: adapters written, INCOMPLETE not yet removed
    raise:after_step:2:1  after optimizer step 2, rank 1 raises RuntimeError (a crash, as a bug would)

Steps are 1-based optimizer steps, as in metrics.jsonl and checkpoint tags. A `hang`/`exit` logs
"fault injection: ..." first, so a test can wait for that line in `logs/train_rank{r}.log`.
Nothing here is read unless the environment variable is set: production runs never pay for it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV = "RSMOE_FAULT"
ACTIONS = ("nan", "inf", "hang", "exit", "raise")
POINTS = ("loss", "after_step", "before_complete", "in_export")
EXIT_CODE = 99


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    steps: frozenset[int]
    ranks: frozenset[int] | None  # None = every rank


def parse(text: str) -> list[Fault]:
    out = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        parts = spec.split(":")
        if len(parts) not in (3, 4) or parts[0] not in ACTIONS or parts[1] not in POINTS:
            raise ValueError(f"{ENV}: bad spec {spec!r}; expected ACTION:POINT:STEPS[:RANKS], "
                             f"ACTION in {ACTIONS}, POINT in {POINTS}")
        steps = frozenset(int(s) for s in parts[2].split(","))
        ranks = frozenset(int(r) for r in parts[3].split(",")) if len(parts) == 4 else None
        out.append(Fault(parts[0], parts[1], steps, ranks))
    return out


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def active(point: str, step: int) -> str | None:
    """The action armed at (point, step) on this rank, or None."""
    text = os.environ.get(ENV)
    if not text:
        return None
    rank = _rank()
    for f in parse(text):
        if f.point == point and step in f.steps and (f.ranks is None or rank in f.ranks):
            return f.action
    return None


def poison_loss(out: dict, step: int) -> dict:
    """`nan`/`inf` at point `loss`: make this micro-batch's loss non-finite, with a live graph (so the
    gradients are non-finite too, as with a real blow-up)."""
    action = active("loss", step)
    if action not in ("nan", "inf"):
        return out
    bad = float("nan") if action == "nan" else float("inf")
    log.warning("fault injection: %s loss at step %d", action, step)
    return {**out, "loss": out["loss"] * bad, "expert_loss": out["expert_loss"] * bad,
            "expert_loss_sum": out["expert_loss_sum"] * bad}


class InjectedCrash(RuntimeError):
    """The `raise` fault: an exception like any bug's, raised where the spec says."""


def fire(point: str, step: int) -> None:
    """`hang`/`exit`/`raise` at a process point (after_step, before_complete, in_export)."""
    action = active(point, step)
    if action not in ("hang", "exit", "raise"):
        return
    log.warning("fault injection: %s at %s of step %d (pid %d)", action, point, step, os.getpid())
    for h in logging.getLogger().handlers:
        h.flush()
    if action == "raise":
        raise InjectedCrash(f"fault injection: raise at {point} of step {step} (pid {os.getpid()})")
    if action == "exit":
        os._exit(EXIT_CODE)
    while True:  # until SIGKILL; SIGTERM only sets the preemption flag
        time.sleep(3600)
