"""Preflight: every check that needs no process group, model or engine, run first, so a typo fails
in a second with one line naming the key and the fix, not after minutes of model building.
See docs/reliability.md for the fault table and the tests behind each row.
"""

from __future__ import annotations

import os
from pathlib import Path

from rsmoe.assets import ASSET_PREFIX, check_installed
from rsmoe.config import ConfigError, ModelArgs, TrainArgs, read_config
from rsmoe.data.loader import expand_shards
from rsmoe.distributed.env import world_info_from_env
from rsmoe.distributed.layout import ParallelLayout
from rsmoe.errors import one_line
from rsmoe.io import model_dir
from rsmoe.models.hf_weights import TOKENIZER_FILES
from rsmoe.training.engine import build_ds_config, load_ds_json
from rsmoe.training.run_lock import RunLock


def _check_spec(spec: str, key: str, kind: str = "path") -> Path | None:
    """An 'asset:NAME' must be installed (not materialised here); a path must exist. None for assets."""
    if spec.startswith(ASSET_PREFIX):
        try:
            check_installed(spec)
        except (KeyError, FileNotFoundError) as exc:
            raise ConfigError(f"config key '{key}': {one_line(exc)}") from None
        return None
    p = Path(spec).expanduser()
    if not p.exists():
        raise ConfigError(
            f"config key '{key}': {kind} {p} does not exist; point it at a local {kind} "
            "(models never download) or at an offline asset (rsmoe assets --list)"
        )
    return p


def _check_model_dir(spec: str, key: str) -> None:
    p = _check_spec(spec, key, "model directory")
    if p is not None and not (p / "config.json").is_file():
        raise ConfigError(f"config key '{key}': {p} is not a Hugging Face model directory (no config.json)")


def _check_tokenizer(spec: str, key: str) -> None:
    p = _check_spec(spec, key, "tokenizer directory")
    if p is not None and not any((p / n).is_file() for n in (*TOKENIZER_FILES, "tokenizer_config.json")):
        raise ConfigError(f"config key '{key}': {p} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")


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
    world = world_size or world_info_from_env().world_size
    ep = args.distributed.ep if args.stage == 2 else 1
    ParallelLayout(n_experts=len(args.model.experts), ep=ep, world_size=world, rank=0)
    build_ds_config(args, load_ds_json(args.deepspeed_config), world // ep)
    check_model_paths(args.model)
    try:
        expand_shards(args.data.train_shards)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"config key 'data.train_shards': {one_line(exc)}") from None
    init_dir = model_dir.stage2_init_dir(args)  # ModelDirError with the fix in its message
    if init_dir is not None:
        check_same_model_as_stage1(args, init_dir)
    run_dir = Path(args.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"config key 'run_dir': cannot create {run_dir}: {exc.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"config key 'run_dir': {run_dir} is not writable")
    if args.checkpoint.lock and world_info_from_env().rank == 0:
        # A live job holds it? Rank 0 only: it is the rank that takes the lock, and a slower rank would
        # otherwise see its own job's lock (taken by a faster rank 0), fail alone and leave rank 0
        # waiting in the lock's collective for ever.
        RunLock(run_dir, args.checkpoint.lock_stale_s, args.checkpoint.lock_wait_s).check()
    check_resume_compatible(args, run_dir)


# What Stage II inherits from Stage I and must not change: the frozen parts' shapes and the Stage I
# adapter that is merged into the base (prompt lengths, experts, router, attention kernel may change).
STAGE1_MODEL_KEYS = ("vision", "qformer", "llm", "lora")
STAGE1_FREE_KEYS = {"qformer.max_instruction_len", "llm.attn_implementation"}


def check_same_model_as_stage1(args: TrainArgs, stage1: Path) -> None:
    """Stage II must build the model its Stage I trained: a differing key is named, with both values."""
    old = model_dir.run_config(stage1).model
    for section in STAGE1_MODEL_KEYS:
        before, now = getattr(old, section), getattr(args.model, section)
        fields = vars(now) if hasattr(now, "__dataclass_fields__") else {"": now}
        for name, value in fields.items():
            key = f"{section}.{name}" if name else section
            was = getattr(before, name) if name else before
            if key not in STAGE1_FREE_KEYS and was != value:
                raise ConfigError(
                    f"config key 'model.{key}': {value!r}, but the Stage I run {stage1} was trained with {was!r}; "
                    f"Stage II builds the model Stage I trained: set model.{key}={was!r} (or retrain Stage I)"
                )


def check_resume_compatible(args: TrainArgs, run_dir: Path) -> None:
    """A run directory holds one run: resuming it with another model or stage is refused."""
    old_file = run_dir / "config.yaml"
    if not old_file.exists() or not args.checkpoint.resume:
        return
    old = read_config(old_file)
    if old.model != args.model or old.stage != args.stage:
        raise ConfigError(
            f"{run_dir} already holds a stage-{old.stage} run with a different model config; "
            "use a new --run-dir, or checkpoint.resume=false to start over in place"
        )
