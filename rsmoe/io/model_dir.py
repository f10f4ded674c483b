"""The model directory (`<run>/final/`): what a finished stage leaves for Stage II, eval, caption,
ask, serve and export to read, in standard formats.

    config.yaml                  resolved training config of the run that wrote it
    visual.safetensors           Q-Former, query tokens, projection
    frozen_random.safetensors    randomly initialised frozen parts (only for random presets)
    stage1_adapter/              Stage I LoRA as a peft adapter (merged into the base for Stage II)
    adapters/<expert>/           Stage II: one peft adapter directory per expert
    router/<expert>.safetensors  Stage II with model.router=learned: each expert's router (rsmoe.io.router_files)
    INCOMPLETE                   present only while the directory is being written: a run killed
                                 mid-export leaves it, and every reader refuses the directory

`resolve` is the one way from a user's path (a run directory or a model directory) to a model
directory; the writing protocol (`begin_write` ... `finish_write`) is driven by the trainer, which
owns the ranks (rsmoe.training.checkpointer.write_final).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from rsmoe.config import TrainArgs, dump_config, read_config
from rsmoe.errors import UserError
from rsmoe.io import adapters, router_files
from rsmoe.io.fs import atomic_write_text, fsync_dir, fsync_tree, load_safetensors, save_safetensors

VISUAL = "visual.safetensors"
FROZEN_RANDOM = "frozen_random.safetensors"
CONFIG = "config.yaml"
STAGE1_ADAPTER = "stage1_adapter"
ADAPTERS = "adapters"
INCOMPLETE = "INCOMPLETE"  # written first, removed last (directories from before it have neither)
STAGE1_EXPERT = "llm"  # the single expert name of a Stage I model

INCOMPLETE_TEXT = (
    "rsmoe train is writing this model directory. If no run is writing it, the run was stopped part-way "
    "and the directory must not be used: run the same train command again (it resumes from the last "
    "checkpoint and writes final/ again), or export a checkpoint with `rsmoe export RUN_DIR --tag latest`.\n"
)


class ModelDirError(UserError, FileNotFoundError):
    """A path that is not (yet) a usable model directory; the message says what to do."""


class IncompleteModelDir(ModelDirError):
    """A final/ directory left by a run stopped while writing it."""


# ---------------------------------------------------------------- finding one


def require_complete(model_dir: str | Path) -> None:
    """Raise if `model_dir` is a model directory whose export never finished."""
    d = Path(model_dir)
    if (d / INCOMPLETE).exists():
        raise IncompleteModelDir(
            f"{d} is incomplete: the run that wrote it was stopped before it finished ({INCOMPLETE} is still there). "
            "Run the same train command again: it resumes from the last checkpoint and writes final/ again "
            "(or export a checkpoint: rsmoe export <run dir> --tag latest)."
        )


def find(path: str | Path) -> Path | None:
    """A run directory's final/, or `path` itself if it is a model directory; None if neither.
    Raises IncompleteModelDir for one whose export never finished."""
    p = Path(path)
    for d in (p / "final", p):
        if (d / VISUAL).exists() or (d / INCOMPLETE).exists():
            require_complete(d)
            return d
    return None


def resolve(path: str | Path) -> Path:
    """A user's path (a run directory or a model directory) -> a complete model directory, or a
    ModelDirError saying why not and what to do."""
    p = Path(path)
    if not p.exists():
        raise ModelDirError(f"model '{path}' does not exist: give a run directory (e.g. runs/demo/stage2) or its final/ directory")
    d = find(p)
    if d is None:
        if (p / "checkpoints").is_dir() or (p / CONFIG).exists():
            raise ModelDirError(
                f"'{path}' is a run directory without a finished model (no final/{VISUAL}): "
                "let the training finish (rerun the same `rsmoe train` command to resume) and try again, "
                "or add --tag latest to export a checkpoint"
            )
        raise ModelDirError(
            f"'{path}' is not an rsmoe model: it has neither {VISUAL} nor final/; "
            "give a run directory written by `rsmoe train` or its final/ directory"
        )
    for needed in (CONFIG, f"{STAGE1_ADAPTER}/{adapters.WEIGHTS}"):
        if not (d / needed).exists():
            raise ModelDirError(f"{d} has no {needed}: it is not a complete rsmoe model directory (copy the whole final/ directory)")
    return d


def stage1_dir(init_from: str | Path | None) -> Path:
    """Stage II's starting point: the model directory of a finished Stage I run (`--init-from`)."""
    if not init_from:
        raise ModelDirError("Stage II needs init_from (--init-from): the Stage I run directory")
    d = find(init_from)
    if d is None:
        raise ModelDirError(
            f"Stage II needs a finished Stage I run: '{init_from}' has no final/{VISUAL}. "
            "Run Stage I to the end first (or point --init-from at its run directory)."
        )
    if not adapters.has_adapter(d / STAGE1_ADAPTER):
        raise ModelDirError(f"config key 'init_from': {d} has no {STAGE1_ADAPTER}/; it is not a finished Stage I run")
    return d


def stage2_init_dir(args: TrainArgs) -> Path | None:
    """Stage II's Stage I directory, or None for `stage2_init=untrained` (the one-stage arm)."""
    if args.stage != 2 or args.stage2_init == "untrained":
        return None
    return stage1_dir(args.init_from)


def run_config(model_dir: Path) -> TrainArgs:
    """The config a model directory was trained with."""
    return read_config(Path(model_dir) / CONFIG)


# ---------------------------------------------------------------- reading


def load_stage1_parts(model_dir: str | Path, model) -> None:
    """Load a directory's frozen random parts, visual side and Stage I adapter into a freshly built
    Stage I model (`rsmoe.models.build.build_model`)."""
    d = Path(model_dir)
    require_complete(d)
    if not (d / VISUAL).exists():
        raise ModelDirError(
            f"{d} is not an rsmoe model directory (no {VISUAL}): give a run's 'final' directory "
            "(written at the end of each stage)"
        )
    if (d / FROZEN_RANDOM).exists():
        _, unexpected = model.load_state_dict(load_safetensors(d / FROZEN_RANDOM), strict=False)
        if unexpected:
            raise KeyError(f"{d}/{FROZEN_RANDOM} has tensors this model lacks: {unexpected[:5]}")
    missing, unexpected = model.visual.load_state_dict(load_safetensors(d / VISUAL), strict=False)
    missing = [k for k in missing if not k.startswith("vision.")]
    if missing or unexpected:
        raise KeyError(f"{d}/{VISUAL} does not fit this config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    adapters.load_expert_adapter(model.experts, 0, d / STAGE1_ADAPTER)


def load_finished_stage(model_dir: str | Path, model, args: TrainArgs) -> None:
    """Load the directory of a finished stage into `model`, built from that stage's `args`.

    Stage II directories give every expert its trained adapter; Stage I gives the single 'llm'.
    Raises ModelDirError naming the experts whose adapters are missing.
    """
    d = Path(model_dir)
    experts = list(args.model.experts)
    if args.stage == 2:
        missing = [e for e in experts if not adapters.has_adapter(d / ADAPTERS / e)]
        if missing:
            raise ModelDirError(
                f"{d}/{ADAPTERS} lacks the adapters of expert(s) {missing}: the Stage II run did not finish "
                "or the directory was copied incompletely"
            )
        load_stage1_parts(d, model)
        ids = list(range(len(experts)))
        model.to_stage2(ids, args.seed, experts, train_qformer=args.model.train_qformer_stage2)
        adapters.load_adapters(model.experts, {slot: d / ADAPTERS / experts[eid] for slot, eid in enumerate(ids)})
        if model.router is not None:
            router_files.load_router(d, model.router, experts)
    else:
        load_stage1_parts(d, model)
        model.expert_names = [STAGE1_EXPERT]


# ---------------------------------------------------------------- writing (driven by the trainer)


def begin_write(out: Path) -> None:
    """First on disk, removed last: a kill anywhere in between leaves a directory nobody will load
    (an earlier export being overwritten included)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / INCOMPLETE, INCOMPLETE_TEXT)
    fsync_dir(out)


def write_stage_files(out: Path, args: TrainArgs, visual: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                      init_dir: Path | None) -> None:
    """The files of one process: visual side, random frozen parts, config; Stage II copies its Stage I
    adapter and random frozen weights from `init_dir` (its in-memory base has that adapter merged)."""
    save_safetensors(visual, out / VISUAL)
    if frozen:
        save_safetensors(frozen, out / FROZEN_RANDOM)
    dump_config(args, out / CONFIG)
    if init_dir is not None:
        shutil.copytree(init_dir / STAGE1_ADAPTER, out / STAGE1_ADAPTER, dirs_exist_ok=True)
        if (init_dir / FROZEN_RANDOM).exists():
            shutil.copyfile(init_dir / FROZEN_RANDOM, out / FROZEN_RANDOM)


def write_noop_stage1_adapter(out: Path, experts, lora: dict[str, torch.Tensor]) -> None:
    """A Stage II run without Stage I (`stage2_init=untrained`) had no Stage I LoRA: its stage1_adapter/
    is the all-zero adapter (a no-op), so every reader loads the directory the usual way. `lora`: the
    experts' stacked LoRA tensors (only their shapes are used)."""
    adapters.write_adapters(experts, {0: out / STAGE1_ADAPTER}, state={k: torch.zeros_like(v) for k, v in lora.items()})


def adapter_dir(out: Path, stage: int, expert: str) -> Path:
    return out / STAGE1_ADAPTER if stage == 1 else out / ADAPTERS / expert


def finish_write(out: Path) -> None:
    fsync_tree(out)  # the marker must not go before the files it guards reach the disk
    (out / INCOMPLETE).unlink()
    fsync_dir(out)
