"""The non-finite-loss guard: a bad step costs nothing that was trained (docs/reliability.md)."""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch

from rsmoe.distributed import collectives
from rsmoe.errors import TrainingHalted

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """Skip optimizer steps whose loss is non-finite on any rank; stop after `tolerance` in a row.

    Per micro-batch the non-finite flag is all-reduced (MAX) over the world, so every rank agrees; it
    stays on the device (no host synchronisation per micro-batch) and is read once per optimizer step.
    A flagged micro-batch is still run through `engine.backward` / `engine.step` - skipping them would
    break DeepSpeed's micro-step counting and, on one rank only, hang ZeRO's gradient reductions -
    but with its loss multiplied by NaN: the accumulated gradients become non-finite on every rank
    and DeepSpeed's overflow check (ZeRO-1/2/3, fp32 and bf16) discards the whole step, zeroes the
    gradients, leaves parameters, optimizer moments and the LR schedule untouched, and reports it
    through `engine.was_step_applied()`, which `end_step` verifies. ZeRO-0 has no such check, so its
    torch optimizer's `step` is wrapped to do the same.
    """

    def __init__(self, engine, tolerance: int):
        self.tolerance = max(1, tolerance)
        self.streak = 0
        self.skipped = 0
        self._flag: torch.Tensor | None = None  # max over this step's micro-batches, on the device
        self._bad: bool | None = None  # the flag read back, once per step
        self._wrap_optimizer(engine)

    def _step_was_bad(self) -> bool:
        if self._bad is None:
            self._bad = self._flag is not None and bool(self._flag.item())
        return self._bad

    def _wrap_optimizer(self, engine) -> None:
        opt = engine.optimizer
        if engine.zero_optimization_stage() == 3:
            _fix_zero3_overflow_skip(opt)
        if hasattr(opt, "overflow"):
            return  # a ZeRO / mixed-precision optimizer: DeepSpeed's overflow skip applies
        original = opt.step

        @functools.wraps(original)  # keeps torch's LR-scheduler marker: no "step() overridden" warning
        def step(*a, **k):
            bad = self._step_was_bad()
            opt.overflow = bad  # the engine reads this to skip the LR step and count skipped_steps
            return None if bad else original(*a, **k)

        opt.step = step
        opt.overflow = False

    def loss_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Collective (every rank, every micro-batch): the loss to pass to `engine.backward`."""
        flag = collectives.all_max((~torch.isfinite(loss.detach())).any().float().reshape(1))
        self._flag = flag if self._flag is None else torch.maximum(self._flag, flag)
        # x * 1.0 is exactly x (and its gradient exactly 1): a good micro-batch is untouched.
        return loss * torch.where(flag[0] > 0, float("nan"), 1.0)

    def end_step(self, engine, step: int, last_checkpoint: Callable[[], str | None]) -> bool:
        """After the optimizer step: True if it was skipped. Raises TrainingHalted past the tolerance.
        `last_checkpoint` is only called (the checkpoint directory only read) when the step was bad."""
        bad = self._step_was_bad()
        self._flag, self._bad = None, None
        if not bad:
            self.streak = 0
            return False
        where = f"last good checkpoint: {last_checkpoint() or 'none (no checkpoint written yet)'}"
        if engine.was_step_applied():
            raise TrainingHalted(
                f"step {step}: non-finite loss, but DeepSpeed applied the optimizer step anyway, so parameters "
                f"may be corrupt; stopped without saving. Resume from the {where}"
            )
        self.streak += 1
        self.skipped += 1
        log.warning("step %d: non-finite loss; optimizer step skipped on every rank (%d in a row, tolerance %d)",
                    step, self.streak, self.tolerance)
        if self.streak >= self.tolerance:
            raise TrainingHalted(
                f"non-finite loss at {self.streak} consecutive steps ({step - self.streak + 1}..{step}); stopped at "
                f"step {step}; {where}. Lower optim.lr, check the data, or raise train.nan_tolerance"
            )
        return True


def _fix_zero3_overflow_skip(opt) -> None:
    """DeepSpeed 0.19.8 ZeRO-3 `step()` partitions every parameter first and re-gathers the persistent
    (small, always-resident) ones in `_post_step`, which its overflow path returns before: after a
    skipped step they stay partitioned (shape [0]) until some forward fetches them, and code that reads
    them between steps breaks. Re-gather them after a skipped step, as `_post_step` would have."""
    original = opt.step

    @functools.wraps(original)
    def step(*a, **k):
        out = original(*a, **k)
        persistent = getattr(opt, "persistent_parameters", None)
        if opt.overflow and persistent:
            persistent[0].all_gather(persistent)
        return out

    opt.step = step
