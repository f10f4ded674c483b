"""Logging setup: rank-prefixed lines for jobs, warnings only for one-shot commands."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path


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


def quiet_logging() -> None:
    """One-shot commands (caption, ask, export): warnings only, and none of the libraries' chatter."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
