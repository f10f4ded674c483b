"""Guards the training loop calls so that a bad input or a bad step costs nothing a user trained.

- `preflight(args)`: every path and layout check that needs no process group, model or engine,
  run first so a typo fails in a second with one line, not after minutes of model building.
- `NonFiniteGuard`: a non-finite loss on any rank skips that optimizer step on every rank
  (through DeepSpeed's own overflow skip) and stops the run after `train.nan_tolerance` in a row.
- `global_data_stats`: the loader's skip counters summed over the data-parallel ranks.
- checkpoint helpers: `fsync_tree` (durable before COMPLETE), `sweep_incomplete` (partial tags).
See docs/reliability.md for the fault table and the tests behind each row.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from rsmoe.config import ConfigError

if TYPE_CHECKING:
    from rsmoe.config import ModelArgs, TrainArgs

log = logging.getLogger(__name__)


class TrainingHalted(RuntimeError):
    """The run stopped itself on purpose (e.g. repeated non-finite loss); the message says why and what is safe."""


def one_line(exc: BaseException) -> str:
    """The user-facing line of an exception (DataLoader workers wrap the original in a traceback)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError quotes its str
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1] if len(lines) > 1 and "Traceback" in text else lines[0]
    return re.sub(r"^[\w.]+(Error|Exception|Halted): ", "", last)


# ---------------------------------------------------------------- preflight


def _check_spec(spec: str, key: str, kind: str = "path") -> Path | None:
    """An 'asset:NAME' must be installed (not materialised here); a path must exist. None for assets."""
    from rsmoe.assets import ASSET_PREFIX, _lookup, _shipped_path

    if spec.startswith(ASSET_PREFIX):
        try:
            _shipped_path(_lookup(spec[len(ASSET_PREFIX) :]))
        except (KeyError, FileNotFoundError) as exc:
            raise ConfigError(f"config key '{key}': {one_line(exc)}") from None
        return None
    p = Path(spec).expanduser()
    if not p.exists():
        raise ConfigError(
            f"config key '{key}': {kind} {p} does not exist; point it at a local {kind} "
            "(models never download) or at an offline asset (rsmoe assets list)"
        )
    return p


def _check_model_dir(spec: str, key: str) -> None:
    p = _check_spec(spec, key, "model directory")
    if p is not None and not (p / "config.json").is_file():
        raise ConfigError(f"config key '{key}': {p} is not a Hugging Face model directory (no config.json)")


def _check_tokenizer(spec: str, key: str) -> None:
    from rsmoe.models.loading import _TOKENIZER_FILES

    p = _check_spec(spec, key, "tokenizer directory")
    if p is not None and not any((p / n).is_file() for n in (*_TOKENIZER_FILES, "tokenizer_config.json")):
        raise ConfigError(f"config key '{key}': {p} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")


def check_model_paths(m: ModelArgs) -> None:
    if m.llm.path:
        _check_model_dir(m.llm.path, "model.llm.path")
    elif not m.llm.tokenizer:
        raise ConfigError("config key 'model.llm.tokenizer': set model.llm.path (a local causal LM) "
                          "or model.llm.tokenizer for a randomly initialised base")
    else:
        _check_tokenizer(m.llm.tokenizer, "model.llm.tokenizer")
    if m.vision.path:
        _check_spec(m.vision.path, "model.vision.path", "vision weights")
    if m.qformer.path:
        _check_model_dir(m.qformer.path, "model.qformer.path")
    if m.qformer.bert_init:
        _check_model_dir(m.qformer.bert_init, "model.qformer.bert_init")
    if m.qformer.tokenizer:
        _check_tokenizer(m.qformer.tokenizer, "model.qformer.tokenizer")


def preflight(args: TrainArgs, world_size: int | None = None) -> None:
    """Raise ConfigError (one line naming the key and the fix) before anything heavy starts."""
    from rsmoe.data.loader import expand_shards
    from rsmoe.distributed import ParallelLayout, world_info_from_env
    from rsmoe.engine import build_ds_config, load_ds_json

    world = world_size or world_info_from_env().world_size
    ep = args.distributed.ep if args.stage == 2 else 1
    try:
        ParallelLayout(n_experts=len(args.model.experts), ep=ep, world_size=world, rank=0)
    except ValueError as exc:
        raise ConfigError(f"config key 'distributed.ep': {exc} (launched with {world} ranks)") from None
    build_ds_config(args, load_ds_json(args.deepspeed_config), world // ep)
    check_model_paths(args.model)
    try:
        expand_shards(args.data.train_shards)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"config key 'data.train_shards': {one_line(exc)}") from None
    if args.stage == 2:
        if not args.init_from:
            raise ConfigError("Stage II needs init_from (--init-from): the Stage I run directory")
        from rsmoe.checkpoint import final_dir_of

        init = final_dir_of(args.init_from)  # FileNotFoundError with the fix in its message
        if not (init / "stage1_adapter" / "adapter_model.safetensors").is_file():
            raise ConfigError(f"config key 'init_from': {init} has no stage1_adapter/; it is not a finished Stage I run")
    run_dir = Path(args.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"config key 'run_dir': cannot create {run_dir}: {exc.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"config key 'run_dir': {run_dir} is not writable")
    from rsmoe.train import check_resume_compatible

    check_resume_compatible(args, run_dir)


# ---------------------------------------------------------------- non-finite loss


class NonFiniteGuard:
    """Skip optimizer steps whose loss is non-finite on any rank; stop after `tolerance` in a row.

    Per micro-batch the non-finite flag is all-reduced (MAX) over the world, so every rank agrees.
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
        self._bad = False
        self._wrap_optimizer(engine)

    def _wrap_optimizer(self, engine) -> None:
        opt = engine.optimizer
        if engine.zero_optimization_stage() == 3:
            _fix_zero3_overflow_skip(opt)
        if hasattr(opt, "overflow"):
            return  # a ZeRO / mixed-precision optimizer: DeepSpeed's overflow skip applies
        original = opt.step

        @functools.wraps(original)  # keeps torch's LR-scheduler marker: no "step() overridden" warning
        def step(*a, **k):
            opt.overflow = self._bad  # the engine reads this to skip the LR step and count skipped_steps
            return None if self._bad else original(*a, **k)

        opt.step = step
        opt.overflow = False

    def loss_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Collective (every rank, every micro-batch): the loss to pass to `engine.backward`."""
        flag = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self._bad = True
            return loss * float("nan")
        return loss

    def end_step(self, engine, step: int, last_checkpoint: str | None) -> bool:
        """After the optimizer step: True if it was skipped. Raises TrainingHalted past the tolerance."""
        bad, self._bad = self._bad, False
        if not bad:
            self.streak = 0
            return False
        where = f"last good checkpoint: {last_checkpoint or 'none (no checkpoint written yet)'}"
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


# ---------------------------------------------------------------- data statistics


def global_data_stats(loader, group=None, device: torch.device | str = "cpu") -> dict[str, float]:
    """Skip counts summed over the data-parallel ranks (collective when distributed).

    Pass the group whose ranks read disjoint data (the expert-DP group: ranks of one EP group read
    the same batches and would be counted ep times over the world).
    """
    stats = loader.stats()
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    out = dict(zip(keys, t.cpu().tolist()))
    out["skipped_total"] = float(sum(out.values()))
    return out


# ---------------------------------------------------------------- checkpoints


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` and the directories themselves to disk (power loss, not just kill -9)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except FileNotFoundError:  # another rank's temp file, renamed meanwhile; its writer syncs it
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TAG_RE = re.compile(r"step\d{8}$")


def sweep_incomplete(ckpt_dir: Path) -> list[str]:
    """Remove tag directories without COMPLETE (left by a run killed mid-save). Rank 0 only."""
    from rsmoe.checkpoint import COMPLETE

    removed = []
    if not ckpt_dir.exists():
        return removed
    for p in sorted(ckpt_dir.iterdir()):
        if p.is_dir() and TAG_RE.match(p.name) and not (p / COMPLETE).exists():
            log.warning("removing incomplete checkpoint %s (its save was interrupted)", p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed
