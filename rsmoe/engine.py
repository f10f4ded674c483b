"""DeepSpeed engine setup: the DS JSON holds ZeRO/offload/comm only; the typed config fills the rest.

`ds_configs/*.json` leave batch sizes, clipping and precision as "auto"; `build_ds_config`
resolves them from `TrainArgs` and refuses optimizer/scheduler blocks (the optimizer is a torch
AdamW handed to `deepspeed.initialize`, which avoids DeepSpeed's fused-Adam JIT build on CPU and
its CUDA-arch build failure on Hopper images).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from rsmoe.config import ConfigError, TrainArgs
from rsmoe.distributed import ParallelLayout, device_type

log = logging.getLogger(__name__)

# Frozen-base LoRA models: keeping every parameter below this size resident avoids ZeRO-3's
# per-layer gather/release of weights that never change (5.5x slower on an H100, DESIGN §7).
PERSISTENCE_AUTO = 10**5


def resolve_precision(args: TrainArgs) -> str:
    p = args.train.precision
    if p == "auto":
        return "bf16" if device_type() == "cuda" else "fp32"
    return p


REPO_ROOT = Path(__file__).resolve().parent.parent


def load_ds_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p  # presets name ds_configs/*.json relative to the checkout; jobs may start elsewhere
    if not p.exists():
        raise ConfigError(f"DeepSpeed config '{p}' not found: pass --deepspeed ds_configs/zero2.json (or zero3.json)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config '{p}' is not valid JSON: {exc}") from None


def build_ds_config(args: TrainArgs, ds: dict[str, Any], dp_size: int) -> dict[str, Any]:
    cfg = json.loads(json.dumps(ds))  # deep copy
    for owned in ("optimizer", "scheduler", "fp16"):
        if owned in cfg:
            raise ConfigError(
                f"DeepSpeed config has an '{owned}' block; rsmoe sets the optimizer, schedule and precision "
                f"from its own config (optim.*, train.precision). Remove '{owned}' from the JSON."
            )
    micro, gas = args.train.micro_batch_size, args.train.grad_accum
    fills = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * dp_size,
        "gradient_clipping": args.optim.clip_grad,
    }
    for k, v in fills.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
        elif cfg[k] != v:
            raise ConfigError(f"DeepSpeed config sets {k}={cfg[k]} but the training config implies {v}; use \"auto\"")
    cfg.setdefault("bf16", {})
    cfg["bf16"]["enabled"] = resolve_precision(args) == "bf16"
    zero = cfg.setdefault("zero_optimization", {})
    if args.distributed.zero_stage >= 0:
        zero["stage"] = args.distributed.zero_stage
    if zero.get("stage3_param_persistence_threshold") == "auto":
        zero["stage3_param_persistence_threshold"] = PERSISTENCE_AUTO
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise ConfigError(f"DeepSpeed config keys still 'auto' that rsmoe does not fill: {leftover}")
    assert cfg["train_batch_size"] == micro * gas * dp_size
    return cfg


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_optimizer(params: list[torch.nn.Parameter], args: TrainArgs):
    o = args.optim
    fused = device_type() == "cuda"  # torch's fused AdamW: fast, and nothing to JIT-compile
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(o.warmup_steps, args.train.steps, o.min_lr_ratio))
    return opt, sched


def build_engine(model: torch.nn.Module, args: TrainArgs, layout: ParallelLayout, ds_json: dict[str, Any]):
    """Returns (engine, ds_config). Only parameters with requires_grad go to the optimizer."""
    import deepspeed

    mpu = layout.mpu(args.stage)
    cfg = build_ds_config(args, ds_json, mpu.get_data_parallel_world_size())
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("nothing to train: every parameter is frozen")
    opt, sched = build_optimizer(params, args)
    # DeepSpeed keeps the mpu in a process global that a later initialize() would inherit: always pass one.
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg, mpu=mpu)
    return engine, cfg


@contextlib.contextmanager
def mpu_of(engine):
    """Point DeepSpeed's process-global mpu at `engine`'s while it runs (several engines per process)."""
    from deepspeed.utils import groups

    old = groups.mpu
    groups.mpu = engine.mpu
    try:
        yield
    finally:
        groups.mpu = old


def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3
