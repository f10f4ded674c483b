"""Preemption: a signal (SLURM's `--signal=USR2@120`, or SIGTERM) asks the run to stop cleanly.

The handler only sets a flag; the training loop checks it after each optimizer step (agreed
across ranks, since only some may have received the signal), writes a checkpoint, and, under
SLURM, requeues the job so it resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

from rsmoe.distributed import collectives

log = logging.getLogger(__name__)

_requested = False
_signame = ""


def _handler(signum, frame) -> None:  # noqa: ARG001
    global _requested, _signame
    _requested = True
    _signame = signal.Signals(signum).name


def install(signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> None:
    for s in signals:
        signal.signal(s, _handler)


def requested() -> bool:
    """True on every rank if any rank got the signal (collective when distributed)."""
    return collectives.any_true(_requested)


def requeue() -> bool:
    """Requeue this SLURM job (rank 0 only). Returns False outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    cmd = ["scontrol", "requeue", job]
    log.warning("preempted (%s): requeueing with %s", _signame or "signal", " ".join(cmd))
    try:
        subprocess.run(cmd, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("requeue failed (%s): resubmit the same command; it resumes from checkpoints/latest", exc)
        return False
    return True
