"""Training metrics: metrics.jsonl + TensorBoard (rank 0 only), and the per-step numbers the loop logs."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from rsmoe.distributed import collectives


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


def global_data_stats(loader, group=None) -> dict[str, float]:
    """Skip counts summed over the data-parallel ranks (collective when distributed).

    Pass the group whose ranks read disjoint data (the expert-DP group: ranks of one EP group read
    the same batches and would be counted ep times over the world).
    """
    stats = loader.stats()
    keys = sorted(stats)
    t = collectives.all_sum(torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64), group)
    out = dict(zip(keys, t.tolist()))
    out["skipped_total"] = float(sum(out.values()))
    return out


def peak_memory_gib() -> float:
    """Peak device memory of this process: CUDA allocations on GPU, peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class LossWindow:
    """Per-expert losses over a logging window, weighted by target tokens.

    A step adds each expert's summed token loss and token count (already summed over micro-batches
    and data-parallel replicas); `scalars` gives `loss/<expert>` = summed loss / tokens over the window,
    left out for an expert with no target token in it (a 0 there would read as a perfect loss),
    `tokens/<expert>`, and `loss/total` = the token-weighted mean over every expert's tokens. With the
    learned router, `route/questions` and (when there were questions) the question-weighted
    `route/loss` and `route/acc` of its route head; with train.itc_weight, `loss/itc` (the contrastive
    term, per caption row; not in loss/total).
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros(len(self.names), dtype=torch.float64)
        self.tokens = torch.zeros(len(self.names), dtype=torch.float64)
        self.route: torch.Tensor | None = None
        self.itc: torch.Tensor | None = None

    def add(self, loss_sum: torch.Tensor, tokens: torch.Tensor, route: torch.Tensor | None = None,
            itc: torch.Tensor | None = None) -> None:
        """`route`: (loss x questions, accuracy x questions, questions) of the learned router's head;
        `itc`: (contrastive loss x rows, rows)."""
        self.loss += loss_sum.double().cpu()
        self.tokens += tokens.double().cpu()
        if route is not None:
            self.route = route.double().cpu() + (0 if self.route is None else self.route)
        if itc is not None:
            self.itc = itc.double().cpu() + (0 if self.itc is None else self.itc)

    def scalars(self) -> dict[str, float]:
        total = float(self.tokens.sum())
        out = {"loss/total": float(self.loss.sum()) / total if total else float("nan")}
        for name, loss, tok in zip(self.names, self.loss.tolist(), self.tokens.tolist()):
            if tok > 0:
                out[f"loss/{name}"] = loss / tok
        out.update({f"tokens/{name}": tok for name, tok in zip(self.names, self.tokens.tolist())})
        if self.route is not None:
            loss, acc, nq = self.route.tolist()
            out["route/questions"] = nq
            if nq:
                out.update({"route/loss": loss / nq, "route/acc": acc / nq})
        if self.itc is not None and self.itc[1] > 0:
            out["loss/itc"] = float(self.itc[0] / self.itc[1])
        return out
