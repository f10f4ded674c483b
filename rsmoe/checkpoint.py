"""Checkpoints: resumable DeepSpeed states, and the exported model directory of a finished stage.

Resumable state (`<run>/checkpoints/`): `engine.save_checkpoint` per tag `stepNNNNNNNN`
(trainable weights, optimizer, scheduler; frozen weights excluded - they come from their source),
plus per-rank `train_state_rank{r}.json` and `rng_rank{r}.pt`. A tag is complete once rank 0 has
written `COMPLETE` in it after a barrier; only then does `latest` (written atomically) point to
it, so a run killed mid-write resumes from the previous complete tag.

Model directory (`<run>/final/`): what Stage II and inference load, in standard formats:
  config.yaml                      resolved training config of the run that wrote it
  visual.safetensors               Q-Former, query tokens, projection
  frozen_random.safetensors        randomly initialised frozen parts (only for random presets)
  stage1_adapter/                  Stage I LoRA as a peft adapter (merged into the base for Stage II)
  adapters/<expert>/               Stage II: one peft adapter directory per expert
  INCOMPLETE                       present only while the directory is being written: a run killed
                                   mid-export leaves it, and every reader refuses the directory
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from rsmoe import faults, guards
from rsmoe.safe_load import restricted_unpickling

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
INCOMPLETE = "INCOMPLETE"  # in final/: written first, removed last (directories from before it have neither)
ENGINE_META = "rsmoe_engine.json"


def engine_meta(module: torch.nn.Module) -> dict[str, Any]:
    """What an engine's DeepSpeed states cover, so export can place them without knowing the layout:
    the engine module's name prefix inside RSMoE and the global ids of the expert adapter slots it holds."""
    from rsmoe.models.experts import ExpertLM
    from rsmoe.models.rsmoe import RSMoE, VisualPrefix

    if isinstance(module, RSMoE):
        return {"prefix": "", "expert_ids": list(module.experts.expert_ids), "expert_names": list(module.expert_names)}
    if isinstance(module, ExpertLM):
        return {"prefix": "experts.", "expert_ids": list(module.expert_ids)}
    if isinstance(module, VisualPrefix):
        return {"prefix": "visual.", "expert_ids": []}
    return {"prefix": "", "expert_ids": []}


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- RNG


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
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def tag_for(self, step: int) -> str:
        return f"step{step:08d}"

    def complete_tags(self) -> list[str]:
        if not self.dir.exists():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and (p / COMPLETE).exists())

    def latest_tag(self) -> str | None:
        latest = self.dir / "latest"
        if latest.exists():
            tag = latest.read_text().strip()
            if (self.dir / tag / COMPLETE).exists():
                return tag
            log.warning("checkpoint 'latest' points to incomplete tag %s; using the newest complete one", tag)
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def save(self, engines: list, step: int, train_state: dict[str, Any], subdirs: list[str] | None = None) -> str:
        """Collective: every rank calls this. `engines[i]` saves under `subdirs[i]` (default: the tag dir)."""
        tag = self.tag_for(step)
        tag_dir = self.dir / tag
        rank = dist.get_rank() if dist.is_initialized() else 0
        if _is_rank0() and tag_dir.exists():
            shutil.rmtree(tag_dir)  # a leftover partial write of the same step
        _barrier()
        for i, engine in enumerate(engines):
            root = self.dir if not subdirs else self.dir / tag / subdirs[i]
            ds_tag = tag if not subdirs else "state"
            engine.save_checkpoint(str(root), tag=ds_tag, save_latest=False, exclude_frozen_parameters=True)
            (root / ds_tag).mkdir(parents=True, exist_ok=True)
            atomic_write_text(root / ds_tag / ENGINE_META, json.dumps(engine_meta(engine.module)))
        tag_dir.mkdir(parents=True, exist_ok=True)
        # grad_accum lets a resume on another rank count map the data position (rsmoe.universal).
        train_state = {**train_state, "grad_accum": engines[0].gradient_accumulation_steps()}
        atomic_write_text(tag_dir / f"train_state_rank{rank}.json", json.dumps(train_state))
        torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
        guards.fsync_tree(tag_dir)  # COMPLETE must never reach the disk before the state it vouches for
        faults.fire("before_complete", step)
        _barrier()
        if _is_rank0():
            atomic_write_text(tag_dir / COMPLETE, str(step))
            atomic_write_text(self.dir / "latest", tag)
            guards.fsync_dir(self.dir)
            self._purge()
        _barrier()
        return tag

    def _purge(self) -> None:
        tags = self.complete_tags()
        for old in tags[: max(0, len(tags) - self.keep)]:
            (self.dir / old / COMPLETE).unlink(missing_ok=True)  # first: a half-deleted tag must not look complete
            shutil.rmtree(self.dir / old, ignore_errors=True)

    @restricted_unpickling()  # DeepSpeed calls torch.load(weights_only=False); refuse arbitrary pickles
    def load(self, engines: list, subdirs: list[str] | None = None) -> dict[str, Any] | None:
        """Restore engines + this rank's train state + RNG from the latest complete tag (None if none).

        If an engine's data-parallel size differs from the one that wrote the tag (the job was
        relaunched on another number of ranks), its states go through a universal checkpoint and the
        per-rank train state is mapped to the new ranks (rsmoe.universal, docs/export.md).
        """
        from rsmoe import universal

        tag = self.latest_tag()
        if tag is None:
            return None
        tag_dir = self.dir / tag
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        reshaped = False
        for i, engine in enumerate(engines):
            root = self.dir if not subdirs else self.dir / tag / subdirs[i]
            ds_tag = tag if not subdirs else "state"
            ds_dir = root / ds_tag
            if not ds_dir.is_dir():
                raise RuntimeError(f"checkpoint {tag} has no {ds_dir}: it was written with another expert layout "
                                   "(distributed.ep); resume with the layout it was written with")
            universal.check_same_stage(engine, ds_dir)
            if universal.saved_dp_size(ds_dir) != engine.dp_world_size:
                log.warning("%s: written by %d data-parallel ranks, loading into %d: reshaping through a universal "
                            "checkpoint", ds_dir, universal.saved_dp_size(ds_dir), engine.dp_world_size)
                universal.load_universal(engine, ds_dir)
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
        saved_world = universal.saved_world_size(tag_dir)
        if reshaped or saved_world != world:
            grad_accum = engines[0].gradient_accumulation_steps()
            state = universal.reshape_train_state(tag_dir, rank, world, saved_world, grad_accum)
            set_rng_state(state.pop("_rng"))
        else:
            state = json.loads((tag_dir / f"train_state_rank{rank}.json").read_text())
            set_rng_state(torch.load(tag_dir / f"rng_rank{rank}.pt", weights_only=True))
        state["tag"] = tag
        return state


# ---------------------------------------------------------------- gathering (ZeRO-3 aware)


def gathered_state(module: torch.nn.Module, keep: Callable[[str, torch.nn.Parameter], bool]) -> dict[str, torch.Tensor]:
    """Full CPU copies of the selected parameters. Collective under ZeRO-3: call on every rank."""
    named = [(n, p) for n, p in module.named_parameters() if keep(n, p)]
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in named}
    return {n: p.detach().float().cpu().clone() for n, p in named}


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


INCOMPLETE_TEXT = (
    "rsmoe train is writing this model directory. If no run is writing it, the run was stopped part-way "
    "and the directory must not be used: run the same train command again (it resumes from the last "
    "checkpoint and writes final/ again), or export a checkpoint with `rsmoe export RUN_DIR --tag latest`.\n"
)


def require_complete(model_dir: str | Path) -> None:
    """Raise if `model_dir` is a model directory whose export never finished."""
    d = Path(model_dir)
    if (d / INCOMPLETE).exists():
        raise IncompleteModelDir(
            f"{d} is incomplete: the run that wrote it was stopped before it finished ({INCOMPLETE} is still there). "
            "Run the same train command again: it resumes from the last checkpoint and writes final/ again "
            "(or export a checkpoint: rsmoe export <run dir> --tag latest)."
        )


class IncompleteModelDir(FileNotFoundError):
    """A final/ directory left by a run stopped while writing it."""


def export_final(
    model,
    args,
    out_dir: str | Path,
    *,
    expert_names: list[str],
    random_frozen: list[str],
    init_dir: str | Path | None,
    write_adapters: bool,
) -> Path:
    """Write the model directory (see module docstring). Collective under ZeRO-3.

    Stage II passes its Stage I directory as `init_dir`: the random frozen weights and the Stage I
    adapter are copied from there (the in-memory base has that adapter merged in already).
    `write_adapters`: this rank writes its local experts' adapters (one rank per expert block).
    """
    from rsmoe.config import dump_config

    out = Path(out_dir)
    visual = gathered_state(model.visual, lambda n, p: not n.startswith("vision."))
    frozen = (
        gathered_state(model, lambda n, p: any(n.startswith(pfx) for pfx in random_frozen) and ".lora_" not in n)
        if random_frozen and init_dir is None
        else {}
    )
    lora = gathered_state(model.experts, lambda n, p: ".lora_" in n)
    if _is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        # First on disk, removed last: a kill anywhere in between leaves a directory nobody will load
        # (an earlier export being overwritten included).
        atomic_write_text(out / INCOMPLETE, INCOMPLETE_TEXT)
        guards.fsync_dir(out)
        _save_safetensors(visual, out / "visual.safetensors")
        if frozen:
            _save_safetensors(frozen, out / "frozen_random.safetensors")
        dump_config(args, out / "config.yaml")
        if init_dir is not None:
            src = Path(init_dir)
            shutil.copytree(src / "stage1_adapter", out / "stage1_adapter", dirs_exist_ok=True)
            if (src / "frozen_random.safetensors").exists():
                shutil.copyfile(src / "frozen_random.safetensors", out / "frozen_random.safetensors")
    _barrier()
    if write_adapters:
        _write_adapters(model.experts, lora, out, expert_names, stage=args.stage)
    faults.fire("in_export", args.train.steps)
    _barrier()
    if _is_rank0():
        guards.fsync_tree(out)  # the marker must not go before the files it guards reach the disk
        (out / INCOMPLETE).unlink()
        guards.fsync_dir(out)
    _barrier()
    return out


def _write_adapters(experts, lora: dict[str, torch.Tensor], out: Path, names: list[str], stage: int) -> None:
    from safetensors.torch import save_file

    base_name = ""
    for slot, eid in enumerate(experts.expert_ids):
        state = {}
        for path in experts.lora_layers:
            state[f"base_model.model.{path}.lora_A.weight"] = lora[f"base.{path}.lora_A"][slot].contiguous()
            state[f"base_model.model.{path}.lora_B.weight"] = lora[f"base.{path}.lora_B"][slot].contiguous()
        d = out / "stage1_adapter" if stage == 1 else out / "adapters" / names[eid]
        d.mkdir(parents=True, exist_ok=True)
        save_file(state, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_text(d / "adapter_config.json", json.dumps(experts.peft_config(base_name), indent=2))


def load_adapter_into(experts, slot: int, adapter_dir: str | Path) -> None:
    state = _load_safetensors(Path(adapter_dir) / "adapter_model.safetensors")
    with torch.no_grad():
        for path, layer in experts.lora_layers.items():
            for ab in ("A", "B"):
                key = f"base_model.model.{path}.lora_{ab}.weight"
                if key not in state:
                    raise KeyError(f"{adapter_dir}: adapter has no tensor {key}; it was trained for another base")
                getattr(layer, f"lora_{ab}")[slot].copy_(state[key])


def find_model_dir(path: str | Path) -> Path | None:
    """A run directory's final/, or `path` itself if it is a model directory; None if neither.
    Raises IncompleteModelDir for one whose export never finished."""
    p = Path(path)
    for d in (p / "final", p):
        if (d / "visual.safetensors").exists() or (d / INCOMPLETE).exists():
            require_complete(d)
            return d
    return None


def final_dir_of(path: str | Path) -> Path:
    """A Stage I run directory (or its final/) -> the model directory Stage II starts from."""
    d = find_model_dir(path)
    if d is not None:
        return d
    raise FileNotFoundError(
        f"Stage II needs a finished Stage I run: '{path}' has no final/visual.safetensors. "
        "Run Stage I to the end first (or point --init-from at its run directory)."
    )


def load_model_dir(
    model_dir: str | Path,
    model,
    *,
    stage2_expert_ids: list[int] | None = None,
    seed: int = 0,
    expert_names: list[str] | None = None,
) -> None:
    """Load a `final/` directory into a freshly built Stage I model.

    If `stage2_expert_ids` is given, the Stage I adapter is merged and the model gets one adapter
    per listed expert: fresh (Stage II init) or, if the directory has them, the trained ones
    (`adapters/<expert_names[id]>/`; names default to the directory's own config.yaml).
    """
    d = Path(model_dir)
    require_complete(d)
    if not (d / "visual.safetensors").exists():
        raise FileNotFoundError(
            f"{d} is not an rsmoe model directory (no visual.safetensors): give a run's 'final' directory "
            "(written at the end of each stage)"
        )
    if (d / "frozen_random.safetensors").exists():
        missing, unexpected = model.load_state_dict(_load_safetensors(d / "frozen_random.safetensors"), strict=False)
        if unexpected:
            raise KeyError(f"{d}/frozen_random.safetensors has tensors this model lacks: {unexpected[:5]}")
    visual = _load_safetensors(d / "visual.safetensors")
    missing, unexpected = model.visual.load_state_dict(visual, strict=False)
    missing = [k for k in missing if not k.startswith("vision.")]
    if missing or unexpected:
        raise KeyError(f"{d}/visual.safetensors does not fit this config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    load_adapter_into(model.experts, 0, d / "stage1_adapter")
    if stage2_expert_ids is not None:
        cfg_names = expert_names if expert_names is not None else _read_expert_names(d)
        model.experts.merge_and_reset(stage2_expert_ids, seed)
        for slot, eid in enumerate(stage2_expert_ids):
            adir = d / "adapters" / cfg_names[eid] if cfg_names and eid < len(cfg_names) else None
            if adir is not None and adir.exists():
                load_adapter_into(model.experts, slot, adir)


def _read_expert_names(d: Path) -> list[str]:
    from rsmoe.config import read_config

    return list(read_config(d / "config.yaml").model.experts) if (d / "config.yaml").exists() else []


def load_finished_stage(model_dir: str | Path, model, args) -> None:
    """Load the `final/` directory of a finished stage into `model`, built from that stage's `args`.

    Stage II directories give every expert its trained adapter; Stage I gives the single 'llm'.
    Raises FileNotFoundError naming the experts whose adapters are missing.
    """
    d = Path(model_dir)
    experts = list(args.model.experts)
    if args.stage == 2:
        missing = [e for e in experts if not (d / "adapters" / e / "adapter_model.safetensors").exists()]
        if missing:
            raise FileNotFoundError(
                f"{d}/adapters lacks the adapters of expert(s) {missing}: the Stage II run did not finish "
                "or the directory was copied incompletely"
            )
        load_model_dir(d, model, stage2_expert_ids=list(range(len(experts))), seed=args.seed, expert_names=experts)
        model.expert_names = experts
    else:
        load_model_dir(d, model)
        model.expert_names = ["llm"]
