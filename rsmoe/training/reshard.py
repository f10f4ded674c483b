"""Resharding: resume a checkpoint on a different number of ranks (DeepSpeed universal checkpoints).

A ZeRO checkpoint stores each parameter's fp32 master copy and Adam moments as flat partitions,
one file per data-parallel rank, so it only loads into the same DP world size. When the DP size of
an engine differs from the one that wrote the tag, rank 0 converts that engine's states once with
DeepSpeed's own `ds_to_universal` (one fp32 / exp_avg / exp_avg_sq file per parameter, plus the step
and LR-scheduler state) into `<tag>[/<subdir>]/universal/`, and every rank loads it with
`load_universal_checkpoint` switched on for that one call. Verified on DeepSpeed 0.19.8 for ZeRO-2
and ZeRO-3 with a torch AdamW and frozen parameters excluded from the checkpoint: the loaded
weights and moments equal the saved ones bit for bit (tests/integration/test_reshape.py).

The ZeRO stage must stay the same (a ZeRO-2 checkpoint's module file is not what a ZeRO-3 engine
reads and vice versa), and so must the expert layout (`distributed.ep`): only the data-parallel size
of each engine may change.

Per-rank state (`train_state_rank{r}.json`, `rng_rank{r}.pt`) is mapped by `reshape_train_state`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from rsmoe.distributed import collectives

log = logging.getLogger(__name__)

UNIVERSAL = "universal"
DONE = "CONVERTED"


def saved_dp_size(ds_dir: Path) -> int:
    """Number of data-parallel ranks that wrote the DeepSpeed checkpoint folder `ds_dir`."""
    ranks = {int(m.group(1)) for f in ds_dir.glob("*optim_states.pt") if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}
    if not ranks:
        raise FileNotFoundError(f"{ds_dir} holds no ZeRO optimizer states (*_optim_states.pt): not a DeepSpeed ZeRO checkpoint")
    return max(ranks) + 1


def saved_zero_stage(ds_dir: Path) -> int:
    """ZeRO-3 writes `zero_pp_rank_*_model_states.pt`; stages 1/2 write `mp_rank_*_model_states.pt`."""
    if any(ds_dir.glob("zero_pp_rank_*_model_states.pt")) or any(ds_dir.glob("bf16_zero_pp_rank_*_model_states.pt")):
        return 3
    if any(ds_dir.glob("mp_rank_*_model_states.pt")):
        return 2
    raise FileNotFoundError(f"{ds_dir} holds no DeepSpeed model states (*_model_states.pt)")


def saved_world_size(tag_dir: Path) -> int:
    """World size of the run that wrote a tag (one train_state file per rank)."""
    n = len(list(tag_dir.glob("train_state_rank*.json")))
    if n == 0:
        raise FileNotFoundError(f"{tag_dir} has no train_state_rank*.json: not an rsmoe checkpoint tag")
    return n


def convert_to_universal(ds_dir: Path) -> Path:
    """`ds_dir` (one engine's ZeRO tag folder) -> `ds_dir/universal`, once; returns it. Call on one rank."""
    from deepspeed.checkpoint import ds_to_universal

    out = ds_dir / UNIVERSAL
    if (out / DONE).exists():
        return out
    tmp = ds_dir / f"{UNIVERSAL}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ns = argparse.Namespace(
        input_folder=str(ds_dir),
        output_folder=str(tmp),
        num_extract_workers=1,  # in-process: no worker pool inside a training job
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # rsmoe's engines do not register `universal_checkpoint_info` (ZeRO-2 needs it; no TP/PP to describe).
        inject_missing_state=True,
    )
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        ds_to_universal.main(ns)
    log.debug("ds_to_universal %s:\n%s", ds_dir, chatter.getvalue())
    (tmp / DONE).write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_universal(engine, ds_dir: Path) -> None:
    """Load `ds_dir`'s states into `engine` whatever DP size wrote them. Collective over the engine's ranks.

    Rank 0 of the world converts (the checkpoint directory is shared by all ranks, as for any resume).
    """
    error: str | None = None
    if collectives.rank() == 0:
        try:
            convert_to_universal(ds_dir)
        except Exception as exc:  # every rank must leave the barrier with the same verdict
            error = f"{type(exc).__name__}: {exc}"
    error = collectives.broadcast_object(error, src=0)
    if error:
        raise RuntimeError(f"could not convert {ds_dir} to a universal checkpoint for a new rank count: {error}")
    cfg = engine._config  # DeepSpeed reads this flag at each load call; on only for this one
    old = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(
            str(ds_dir),
            tag=UNIVERSAL,
            load_module_strict=False,  # frozen weights were excluded on save
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    finally:
        cfg.load_universal_checkpoint = old
    if path is None:
        raise RuntimeError(f"could not load universal checkpoint {ds_dir / UNIVERSAL}: DeepSpeed found no state")


def check_same_stage(engine, ds_dir: Path) -> None:
    saved, now = saved_zero_stage(ds_dir), engine.zero_optimization_stage()
    if (saved == 3) != (now == 3):
        raise RuntimeError(
            f"checkpoint {ds_dir} was written with ZeRO-{saved} but this run uses ZeRO-{now}; "
            f"resume with the DeepSpeed config (ZeRO stage) it was written with"
        )


# ---------------------------------------------------------------- per-rank train state


def reshape_train_state(tag_dir: Path, rank: int, world_size: int, saved_world: int, grad_accum: int) -> dict[str, Any]:
    """This rank's train state when `saved_world` ranks wrote the tag and `world_size` resume it.

    step / samples / tokens are global counters (equal on every rank): taken from rank 0.
    Data position: the loader state is (epoch, micro-batches consumed) of this rank's own stream, and
    every rank consumed the same number (steps x grad_accum). A new rank continues its *own* stream
    (seed, epoch, new rank, new world size) at the same step: batches_consumed = steps done in the epoch
    x the current grad_accum. The samples it sees next are therefore not the ones the old layout would
    have read (the shards are resampled with replacement, so the distribution is the same), and the
    global batch changes with the world size unless grad_accum is scaled to match.
    RNG: new rank r takes old rank r % saved_world's generator state.
    """
    states = [json.loads((tag_dir / f"train_state_rank{r}.json").read_text()) for r in range(saved_world)]
    base = dict(states[0])
    data = base.get("data")
    if data is not None:
        consumed = {s["data"]["batches_consumed"] for s in states if s.get("data")}
        if len(consumed) > 1:
            log.warning("ranks of %s disagree on the data position %s; using rank 0's", tag_dir.name, sorted(consumed))
        old_accum = int(base.get("grad_accum") or 0)
        steps_in_epoch = data["batches_consumed"] // old_accum if old_accum else None
        if steps_in_epoch is None:
            # Tags without grad_accum recorded: assume it did not change.
            steps_in_epoch = data["batches_consumed"] // max(1, grad_accum)
        base["data"] = {"epoch": int(data["epoch"]), "batches_consumed": int(steps_in_epoch * grad_accum)}
    rng = torch.load(tag_dir / f"rng_rank{rank % saved_world}.pt", weights_only=True)
    log.warning(
        "resuming %s (written by %d ranks) on %d ranks: ZeRO states reshaped through a universal checkpoint; "
        "rank %d continues its own data stream at micro-batch %s of epoch %s (see docs/export.md)",
        tag_dir.name, saved_world, world_size, rank,
        base["data"]["batches_consumed"] if base.get("data") else "-", base["data"]["epoch"] if base.get("data") else "-",
    )
    base["_rng"] = rng
    return base
