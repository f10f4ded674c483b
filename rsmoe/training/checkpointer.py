"""Checkpoints of a training run: resumable DeepSpeed states, and the model directory at the end.

Resumable state (`<run>/checkpoints/`, layout in rsmoe.io.checkpoints): `engine.save_checkpoint`
per tag `stepNNNNNNNN` (trainable weights, optimizer, scheduler; frozen weights excluded - they come
from their source), plus per-rank `train_state_rank{r}.json` (TrainState) and `rng_rank{r}.pt`. A tag
is complete once rank 0 has written `COMPLETE` in it after a barrier; only then does `latest`
(written atomically) point to it, so a run killed mid-write resumes from the previous complete tag.

The model directory (`<run>/final/`, layout in rsmoe.io.model_dir) is written by `write_final`,
collectively (ZeRO-3 gathers the weights over the ranks).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from rsmoe.config import TrainArgs
from rsmoe.distributed import collectives
from rsmoe.io import adapters, checkpoints, model_dir, router_files
from rsmoe.io.fs import atomic_write_text, fsync_dir, fsync_tree
from rsmoe.io.safe_load import restricted_unpickling
from rsmoe.models.experts import ExpertLM
from rsmoe.models.model import RSMoE, VisualPrefix
from rsmoe.testing import faults
from rsmoe.training import reshard
from rsmoe.training.state import TrainState

log = logging.getLogger(__name__)


def engine_meta(module: torch.nn.Module) -> dict[str, Any]:
    """What an engine's DeepSpeed states cover, so export can place them without knowing the layout:
    the engine module's name prefix inside RSMoE and the global ids of the expert adapter slots it holds."""
    if isinstance(module, RSMoE):
        return {"prefix": "", "expert_ids": list(module.experts.expert_ids), "expert_names": list(module.expert_names)}
    if isinstance(module, ExpertLM):
        return {"prefix": "experts.", "expert_ids": list(module.expert_ids)}
    if isinstance(module, VisualPrefix):
        return {"prefix": "visual.", "expert_ids": []}
    return {"prefix": "", "expert_ids": []}


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- resumable checkpoints


class CheckpointManager:
    """Saves and restores a run's engines and TrainState under `<run>/checkpoints/`.

    `subdirs[i]` names engine i's folder inside a tag (expert parallelism: one folder per expert
    block); None puts one engine's DeepSpeed files directly in the tag. Every rank calls every method
    that touches engines (they are collectives); rank 0 alone writes markers and purges old tags.
    """

    def __init__(self, run_dir: str | Path, keep: int = 2, subdirs: list[str] | None = None):
        self.dir = checkpoints.checkpoint_dir(run_dir)
        self.keep = keep
        self.subdirs = subdirs

    def tag_for(self, step: int) -> str:
        return checkpoints.tag_for(step)

    def complete_tags(self) -> list[str]:
        return checkpoints.complete_tags(self.dir)

    def latest_tag(self) -> str | None:
        return checkpoints.latest_tag(self.dir)

    def _engine_dir(self, tag: str, i: int) -> tuple[Path, str]:
        """(root, DeepSpeed tag) of engine i's states in `tag`."""
        if not self.subdirs:
            return self.dir, tag
        return self.dir / tag / self.subdirs[i], "state"

    def sweep_incomplete(self) -> list[str]:
        """Remove tag directories without COMPLETE (left by a run killed mid-save). Rank 0 only."""
        removed = []
        for p in checkpoints.incomplete_tags(self.dir):
            log.warning("removing incomplete checkpoint %s (its save was interrupted)", p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        return removed

    def save(self, engines: list, state: TrainState) -> str:
        """Collective: every rank calls this. Returns the tag written."""
        step = state.step
        tag = self.tag_for(step)
        tag_dir = self.dir / tag
        rank = collectives.rank()
        if rank == 0 and tag_dir.exists():
            shutil.rmtree(tag_dir)  # a leftover partial write of the same step
        collectives.barrier()
        for i, engine in enumerate(engines):
            root, ds_tag = self._engine_dir(tag, i)
            engine.save_checkpoint(str(root), tag=ds_tag, save_latest=False, exclude_frozen_parameters=True)
            (root / ds_tag).mkdir(parents=True, exist_ok=True)
            atomic_write_text(root / ds_tag / checkpoints.ENGINE_META, json.dumps(engine_meta(engine.module)))
        tag_dir.mkdir(parents=True, exist_ok=True)
        # grad_accum lets a resume on another rank count map the data position (rsmoe.training.reshard).
        record = {**state.to_dict(), "grad_accum": engines[0].gradient_accumulation_steps()}
        atomic_write_text(tag_dir / f"train_state_rank{rank}.json", json.dumps(record))
        torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
        fsync_tree(tag_dir)  # COMPLETE must never reach the disk before the state it vouches for
        faults.fire("before_complete", step)
        collectives.barrier()
        if rank == 0:
            atomic_write_text(tag_dir / checkpoints.COMPLETE, str(step))
            atomic_write_text(self.dir / checkpoints.LATEST, tag)
            fsync_dir(self.dir)
            self._purge()
        collectives.barrier()
        return tag

    def _purge(self) -> None:
        tags = self.complete_tags()
        for old in tags[: max(0, len(tags) - self.keep)]:
            (self.dir / old / checkpoints.COMPLETE).unlink(missing_ok=True)  # first: a half-deleted tag must not look complete
            shutil.rmtree(self.dir / old, ignore_errors=True)

    @restricted_unpickling()  # DeepSpeed calls torch.load(weights_only=False); refuse arbitrary pickles
    def load(self, engines: list) -> tuple[TrainState, str] | None:
        """Restore engines + this rank's train state + RNG from the latest complete tag (None if none).

        If an engine's data-parallel size differs from the one that wrote the tag (the job was
        relaunched on another number of ranks), its states go through a universal checkpoint and the
        per-rank train state is mapped to the new ranks (rsmoe.training.reshard, docs/export.md).
        """
        tag = self.latest_tag()
        if tag is None:
            return None
        tag_dir = self.dir / tag
        rank, world = collectives.rank(), collectives.world_size()
        reshaped = False
        for i, engine in enumerate(engines):
            root, ds_tag = self._engine_dir(tag, i)
            ds_dir = root / ds_tag
            if not ds_dir.is_dir():
                raise RuntimeError(f"checkpoint {tag} has no {ds_dir}: it was written with another expert layout "
                                   "(distributed.ep); resume with the layout it was written with")
            reshard.check_same_stage(engine, ds_dir)
            if reshard.saved_dp_size(ds_dir) != engine.dp_world_size:
                log.warning("%s: written by %d data-parallel ranks, loading into %d: reshaping through a universal "
                            "checkpoint", ds_dir, reshard.saved_dp_size(ds_dir), engine.dp_world_size)
                reshard.load_universal(engine, ds_dir)
                reshaped = True
                continue
            path, _ = engine.load_checkpoint(
                str(root),
                tag=ds_tag,
                load_module_strict=False,  # frozen weights were excluded on save
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if path is None:
                raise RuntimeError(f"could not load checkpoint {root}/{tag}: DeepSpeed found no state")
        saved_world = reshard.saved_world_size(tag_dir)
        if reshaped or saved_world != world:
            grad_accum = engines[0].gradient_accumulation_steps()
            record = reshard.reshape_train_state(tag_dir, rank, world, saved_world, grad_accum)
            set_rng_state(record.pop("_rng"))
        else:
            record = json.loads((tag_dir / f"train_state_rank{rank}.json").read_text())
            set_rng_state(torch.load(tag_dir / f"rng_rank{rank}.pt", weights_only=True))
        return TrainState.from_dict(record), tag


# ---------------------------------------------------------------- the model directory


def gathered_state(module: torch.nn.Module, keep: Callable[[str, torch.nn.Parameter], bool]) -> dict[str, torch.Tensor]:
    """Full CPU copies of the selected parameters. Collective under ZeRO-3: call on every rank."""
    named = [(n, p) for n, p in module.named_parameters() if keep(n, p)]
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in named}
    return {n: p.detach().float().cpu().clone() for n, p in named}


def random_frozen_prefixes(args: TrainArgs) -> list[str]:
    """Frozen parts without a source path: their weights must travel with the run."""
    out = []
    if not args.model.vision.path:
        out.append("visual.vision.")
    if not args.model.llm.path:
        out.append("experts.base.")
    return out


def write_final(model: RSMoE, args: TrainArgs, out: Path, *, init_dir: Path | None, write_adapters: bool) -> Path:
    """Write the model directory of a finished stage. Collective under ZeRO-3.

    Stage II passes its Stage I directory as `init_dir` (rsmoe.io.model_dir.write_stage_files); None
    there means stage2_init=untrained. `write_adapters`: this rank writes its local experts' adapters
    and, with the learned router, their router files (one rank per expert block).
    """
    random_frozen = random_frozen_prefixes(args)
    visual = gathered_state(model.visual, lambda n, p: not n.startswith("vision."))
    frozen = (
        gathered_state(model, lambda n, p: any(n.startswith(pfx) for pfx in random_frozen) and ".lora_" not in n)
        if random_frozen and init_dir is None
        else {}
    )
    lora = gathered_state(model.experts, lambda n, p: ".lora_" in n)
    router = gathered_state(model.router, lambda n, p: True) if model.router is not None else None
    experts = model.experts

    if collectives.rank() == 0:
        model_dir.begin_write(out)
        model_dir.write_stage_files(out, args, visual, frozen, init_dir)
        if args.stage == 2 and init_dir is None:  # stage2_init=untrained: no Stage I LoRA existed
            model_dir.write_noop_stage1_adapter(out, experts, lora)
    collectives.barrier()
    if write_adapters:
        dirs = {slot: model_dir.adapter_dir(out, args.stage, args.model.experts[eid]) for slot, eid in enumerate(experts.expert_ids)}
        adapters.write_adapters(experts, dirs, state=lora)
        if router is not None:
            for slot, eid in enumerate(experts.expert_ids):
                router_files.write_expert_router(out, args.model.experts[eid], router_files.slot_state(router, slot))
    faults.fire("in_export", args.train.steps)
    collectives.barrier()
    if collectives.rank() == 0:
        model_dir.finish_write(out)
    collectives.barrier()
    return out
