"""The training state a checkpoint carries besides the engines' tensors (one JSON file per rank)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done (1-based in logs and checkpoint tags)."""
    samples: int = 0
    """Samples seen over every data-parallel rank."""
    tokens: int = 0
    """LLM positions (prefix + text) processed over every rank."""
    data: dict[str, int] | None = None
    """This rank's loader position ({"epoch", "batches_consumed"}); None before the first step."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        """Fields this version knows (checkpoints also record e.g. grad_accum for resharding)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
