"""DeepSpeed engine setup: the DS JSON holds ZeRO/offload/comm only; the typed config fills the rest.

`ds_configs/*.json` leave batch sizes, clipping and precision as "auto"; `build_ds_config`
resolves them from `TrainArgs` and refuses optimizer/scheduler blocks (the optimizer is a torch
AdamW handed to `deepspeed.initialize`, which avoids DeepSpeed's fused-Adam JIT build on CPU and
its CUDA-arch build failure on Hopper images).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from rsmoe.config import ConfigError, TrainArgs
from rsmoe.distributed.env import device_type
from rsmoe.distributed.layout import ParallelLayout

log = logging.getLogger(__name__)

# ZeRO-3 "auto" persistence without a model to size (DeepSpeed's own default).
PERSISTENCE_AUTO = 10**5
# ZeRO-3 "auto" with a model: parameters stay resident (never partitioned, never re-gathered) while
# their 16-bit weights fit in this share of the device's memory; the rest is partitioned.
RESIDENT_FRACTION = 0.5


def resolve_precision(args: TrainArgs) -> str:
    p = args.train.precision
    if p == "auto":
        return "bf16" if device_type() == "cuda" else "fp32"
    return p


REPO_ROOT = Path(__file__).resolve().parents[2]


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


def device_memory_bytes() -> int:
    """Total memory of this rank's device (GPU memory on CUDA, physical RAM on CPU)."""
    if device_type() == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def zero3_residency(model: torch.nn.Module, zero: dict[str, Any], bytes_per_param: int) -> dict[str, int]:
    """The persistence thresholds ZeRO-3 "auto" gets for `model` (see docs/performance.md).

    ZeRO-3 partitions every parameter and all-gathers it before each use. For a frozen-base LoRA
    model that is pure overhead while the weights fit: frozen weights have no gradients and no
    optimizer state to partition, and on one rank a "partition" is the whole tensor. So: every
    parameter is eligible to stay resident (param threshold = the largest tensor), and DeepSpeed's
    model-wide cap (`stage3_model_persistence_threshold`) is set to what fits in RESIDENT_FRACTION
    of the device; DeepSpeed then keeps tensors resident in module order until that cap and
    partitions the rest. Trainable parameters still get ZeRO-3's partitioned gradients, fp32
    master weights and optimizer state. With parameter offload configured nothing stays resident
    beyond DeepSpeed's default: the user asked for the weights to live elsewhere.
    """
    offload = (zero.get("offload_param") or {}).get("device", "none")
    if offload not in (None, "none"):
        return {"stage3_param_persistence_threshold": PERSISTENCE_AUTO}
    numels = [p.numel() for p in model.parameters()]
    budget = int(RESIDENT_FRACTION * device_memory_bytes()) // bytes_per_param
    total = sum(numels)
    log.info(
        "ZeRO-3 residency: %s of %s parameters fit the resident budget (%.1f GiB = %.0f%% of device memory); %s",
        f"{min(total, budget):,}", f"{total:,}", budget * bytes_per_param / 2**30, 100 * RESIDENT_FRACTION,
        "nothing is partitioned on the forward path" if total <= budget else "the rest is partitioned",
    )
    out = {"stage3_param_persistence_threshold": max(numels, default=0), "stage3_model_persistence_threshold": budget}
    if total <= budget:
        # DeepSpeed's memory-efficient linear (a Python autograd Function that replaces F.linear for
        # the whole process) exists to re-gather partitioned weights in backward; resident weights
        # never are, so it only adds per-call overhead and loses the fused bias GEMM.
        out["memory_efficient_linear"] = False
    return out


def resident_parameters(model: torch.nn.Module, param_threshold: int, model_threshold: int) -> set[int]:
    """ids of the parameters DeepSpeed will keep resident: the same greedy walk as its
    `DeepSpeedZeRoOffload.mark_persistent_parameters` (0.19.8), in `named_parameters` order."""
    out, total = set(), 0
    for _, p in model.named_parameters(recurse=True):
        if p.numel() + total > model_threshold:
            continue
        if p.numel() <= param_threshold:
            out.add(id(p))
            total += p.numel()
    return out


def mark_frozen_resident_leaves(model: torch.nn.Module, resident: set[int]) -> list[str]:
    """Make every largest frozen, resident subtree (below the root) one ZeRO-3 "leaf" module.

    ZeRO-3 hooks every module (fetch before forward, release after, the same in backward). For a
    subtree whose weights are resident that bookkeeping moves nothing yet costs Python time per
    module per step (the step's main overhead at one rank). A leaf is fetched once as a whole. Only
    frozen subtrees qualify: DeepSpeed reduces a leaf's gradients in a module backward hook, which
    fires early when the module's inputs need no gradient. Containers are never leaves (their own
    forward never runs, so the leaf's fetch would never fire).
    """
    from deepspeed.utils import set_z3_leaf_module

    containers = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential, torch.nn.ParameterList)
    marked: list[str] = []

    def visit(name: str, mod: torch.nn.Module) -> None:
        params = list(mod.parameters())
        if not params:
            return
        if not isinstance(mod, containers) and all(not p.requires_grad and id(p) in resident for p in params):
            set_z3_leaf_module(mod, True)
            marked.append(name)
            return
        for child_name, child in mod.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    for child_name, child in model.named_children():
        visit(child_name, child)
    return marked


def build_ds_config(
    args: TrainArgs, ds: dict[str, Any], dp_size: int, model: torch.nn.Module | None = None
) -> dict[str, Any]:
    """Resolve "auto" entries. With `model`, ZeRO-3's "auto" persistence is sized to it (zero3_residency)."""
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
    if zero.get("stage") == 3:
        zero.setdefault("stage3_param_persistence_threshold", "auto")  # e.g. zero2.json with distributed.zero_stage=3
    if zero.get("stage3_param_persistence_threshold") == "auto":
        if model is not None and zero.get("stage") == 3:
            resident = zero3_residency(model, zero, 2 if cfg["bf16"]["enabled"] else 4)
            zero["stage3_param_persistence_threshold"] = resident["stage3_param_persistence_threshold"]
            for key in ("stage3_model_persistence_threshold", "memory_efficient_linear"):
                if key in resident and zero.get(key, "auto") == "auto":
                    zero[key] = resident[key]
        else:
            zero["stage3_param_persistence_threshold"] = PERSISTENCE_AUTO
    if zero.get("stage3_model_persistence_threshold") == "auto":
        zero["stage3_model_persistence_threshold"] = 2**62  # DeepSpeed's "no cap"
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


def param_groups(model: torch.nn.Module, args: TrainArgs) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
    """The trainable parameters; with optim.visual_lr_scale != 1 or optim.adapter_delay_steps > 0, two
    groups: the adapters (and anything else not visual) at lr, then the visual side (Q-Former, query
    tokens, projection) at lr x visual_lr_scale."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    o = args.optim
    if o.visual_lr_scale == 1.0 and o.adapter_delay_steps == 0:
        return [p for _, p in trainable]
    visual = [p for n, p in trainable if n.startswith("visual.")]
    rest = [p for n, p in trainable if not n.startswith("visual.")]
    if o.adapter_delay_steps and not visual:
        raise ConfigError(f"config key 'optim.adapter_delay_steps': {o.adapter_delay_steps} steps with nothing "
                          "training (the visual side is frozen in this stage); set it to 0 for this stage "
                          "(stage_overrides) or train the visual side (model.train_qformer_stage2=true)")
    # The adapters' group first: metrics log group 0's learning rate as optim/lr.
    return [{"params": g, "lr": o.lr * s, "visual": g is visual}
            for g, s in ((rest, 1.0), (visual, o.visual_lr_scale)) if g]


def delayed(fn, delay: int):
    """`fn` started `delay` steps late: 0 before, then fn(step - delay)."""
    return lambda step: 0.0 if step < delay else fn(step - delay)


def build_optimizer(params: list[torch.nn.Parameter] | list[dict[str, Any]], args: TrainArgs):
    o = args.optim
    # torch's fused AdamW: one multi-threaded kernel, nothing to JIT-compile. On CPU it matters too: under
    # ZeRO the optimizer sees one flat fp32 partition, and the unfused step's full-size temporaries cost
    # ~8x the fused kernel (125M params: 1.1 s vs 0.14 s CPU time).
    fused = device_type() in ("cuda", "cpu")
    groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else None
    visual_flags = [g.pop("visual") for g in groups] if groups else []
    opt = torch.optim.AdamW(groups or params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, fused=fused)
    schedule = warmup_cosine(o.warmup_steps, args.train.steps, o.min_lr_ratio)
    if o.adapter_delay_steps:
        late = delayed(warmup_cosine(o.warmup_steps, args.train.steps - o.adapter_delay_steps, o.min_lr_ratio),
                       o.adapter_delay_steps)
        schedule = [schedule if visual else late for visual in visual_flags]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return opt, sched


def build_engine(model: torch.nn.Module, args: TrainArgs, layout: ParallelLayout, ds_json: dict[str, Any]):
    """Returns (engine, ds_config). Only parameters with requires_grad go to the optimizer."""
    import deepspeed

    mpu = layout.mpu(args.stage)
    cfg = build_ds_config(args, ds_json, mpu.get_data_parallel_world_size(), model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("nothing to train: every parameter is frozen")
    opt, sched = build_optimizer(param_groups(model, args), args)
    # DeepSpeed keeps the mpu in a process global that a later initialize() would inherit: always pass one.
    zero = cfg["zero_optimization"]
    if zero.get("stage") == 3:
        resident = resident_parameters(
            model, int(zero["stage3_param_persistence_threshold"]), int(zero.get("stage3_model_persistence_threshold", 2**62))
        )
        leaves = mark_frozen_resident_leaves(model, resident)
        log.info("ZeRO-3: %d frozen resident subtrees fetched as one module each", len(leaves))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg, mpu=mpu)
    return engine, cfg


def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3
