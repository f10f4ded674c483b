"""Logging: rank-prefixed log lines, and metrics to metrics.jsonl + TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank, self.t0 = rank, time.time()

    def format(self, record: logging.LogRecord) -> str:
        elapsed = time.strftime("%H:%M:%S", time.gmtime(record.created - self.t0))
        return f"[rank{self.rank} {elapsed} {record.levelname[0]}] {record.name}: {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else ""
        )


def setup_logging(rank: int, log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = _RankFormatter(rank)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    # Other ranks only report warnings: N copies of every info line help nobody.
    stream.setLevel(level if rank == 0 else logging.WARNING)
    root.addHandler(stream)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep rows with step <= last_step (and drop a line cut short by a kill), atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= last_step:
            keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


class MetricLogger:
    """Appends {step, ...} to metrics.jsonl and mirrors scalars/text to TensorBoard. No-op off rank 0."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, resume_step: int | None = None):
        """`resume_step`: the step the run (re)starts from; rows logged after it by a run that died before
        its next checkpoint are dropped (they are about to be recomputed) from metrics.jsonl and TensorBoard."""
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _truncate_jsonl(run_dir / "metrics.jsonl", resume_step)
        self.file = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.file.flush()
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self.writer:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
