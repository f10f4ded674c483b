"""The on-disk layout of resumable checkpoints (`<run>/checkpoints/`), shared by the trainer that
writes them (rsmoe.training.checkpointer) and `rsmoe export --tag` that reads them.

    checkpoints/latest                          tag of the newest COMPLETE checkpoint (written atomically)
    checkpoints/step00000040/                   one tag per saved step
        COMPLETE                                written by rank 0 last, after every rank's files are on disk
        train_state_rank{r}.json, rng_rank{r}.pt  per-rank train state (rsmoe.training.state.TrainState)
        <DeepSpeed files> + rsmoe_engine.json   one engine: its states directly in the tag
        experts-<name>[+<name>]/state/...       expert parallelism: one DeepSpeed folder per expert block

A tag without COMPLETE is a save that was interrupted: never loaded, swept at the next start.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
ENGINE_META = "rsmoe_engine.json"
TAG_RE = re.compile(r"step\d{8}$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def parse_tag(text: str) -> str:
    """'latest' stays; 'step00000050', '50' and 'step50' all name tag step00000050."""
    m = re.fullmatch(r"(?:step)?0*(\d+)", text)
    return tag_for(int(m.group(1))) if m else text


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.exists():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).exists())


def incomplete_tags(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.exists():
        return []
    return [p for p in sorted(ckpt_dir.iterdir()) if p.is_dir() and TAG_RE.match(p.name) and not (p / COMPLETE).exists()]


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names if it is complete, else the newest complete tag (None: no checkpoint)."""
    latest = ckpt_dir / LATEST
    if latest.exists():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).exists():
            return tag
        log.warning("checkpoint 'latest' points to incomplete tag %s; using the newest complete one", tag)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def tag_step(ckpt_dir: Path, tag: str) -> int:
    """The optimizer step a complete tag was written at (its COMPLETE marker holds it)."""
    return int((ckpt_dir / tag / COMPLETE).read_text().strip() or 0)
