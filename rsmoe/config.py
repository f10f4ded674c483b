"""Typed configuration: dataclass defaults < YAML preset < dotted command-line overrides.

Every knob lives here, documented where it is defined. Presets are YAML files in
`rsmoe/configs/` (name them by stem: `tiny`, `demo`, `rsmoe-1b`, `rsmoe-7b`) or any path.
Overrides are `section.key=value`, parsed as YAML scalars/lists (`optim.lr=1e-4`,
`model.experts=[theme,objects]`). Unknown keys and wrong types fail with the key named.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key."""


@dataclass
class VisionArgs:
    type: str = "vit"
    """'vit' (InstructBLIP EVA-ViT layout; random init or from `path`), 'efficientnet' (frozen CNN grid encoder)."""
    path: str = ""
    """Local InstructBLIP checkpoint dir for 'vit', weights file (or 'asset:efficientnet-lite0') for 'efficientnet'. Empty = random init."""
    image_size: int = 224
    hidden_size: int = 1408
    num_layers: int = 39
    num_heads: int = 16
    intermediate_size: int = 6144
    patch_size: int = 14
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])


@dataclass
class QFormerArgs:
    num_query_tokens: int = 32
    path: str = ""
    """Local InstructBLIP checkpoint dir to load the Q-Former (+ query tokens, projection if shapes fit). Empty = random."""
    bert_init: str = ""
    """Local BERT dir (or 'asset:minilm-l6') to initialise the Q-Former's text/self-attention weights, as InstructBLIP did."""
    tokenizer: str = ""
    """Tokenizer for the instruction fed to the Q-Former (BERT vocab). Empty = the `path`/`bert_init` dir's tokenizer."""
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    max_instruction_len: int = 32
    vocab_size: int = 30522


@dataclass
class LLMArgs:
    path: str = ""
    """Local causal-LM directory (Llama/Vicuna layout) or 'asset:smollm2-135m-instruct'. Empty = random tiny Llama from the sizes below."""
    tokenizer: str = ""
    """Tokenizer dir when `path` is empty (random base), e.g. 'asset:tiny-tokenizer'."""
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    init_std: float = 0.02
    """Init std of a random base. Tiny presets use a larger one: at 0.02 a 64-wide frozen LM head caps logits near +-1."""
    attn_implementation: str = "sdpa"
    """'sdpa' or 'flash_attention_2' (used only when flash-attn is installed; otherwise sdpa with a warning)."""


@dataclass
class LoRAArgs:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    """Dropout on the LoRA input. 0 keeps runs bit-reproducible across layouts."""
    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    """Linear layers of the expert base that get adapters (the paper's FFN placement by default)."""


@dataclass
class ModelArgs:
    vision: VisionArgs = field(default_factory=VisionArgs)
    qformer: QFormerArgs = field(default_factory=QFormerArgs)
    llm: LLMArgs = field(default_factory=LLMArgs)
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    experts: list[str] = field(default_factory=lambda: ["theme", "objects", "relations"])
    """Expert names, in caption-composition order. The template router knows theme/objects/relations."""
    router: str = "template"
    max_prompt_len: int = 48
    max_target_len: int = 96
    train_qformer_stage2: bool = False
    """Also train Q-Former + projection in Stage II (off by default, as in the paper)."""
    gradient_checkpointing: bool = False


@dataclass
class DataArgs:
    train_shards: str = "data/shards/sample/train-*.tar"
    """Webdataset shard pattern(s) (brace/glob). Several patterns separated by ' :: '."""
    val_shards: str = "data/shards/sample/val-*.tar"
    num_workers: int = 0
    shuffle_buffer: int = 200
    vqa_prob: float = 0.0
    """Probability that a sample with QA trains one question: Stage I instead of its caption; Stage II
    in addition to its sub-captions, on the expert the router picks (keeps the experts answering)."""


@dataclass
class OptimArgs:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0 = off)."""


@dataclass
class TrainLoopArgs:
    steps: int = 100
    """Optimizer steps in this stage."""
    micro_batch_size: int = 2
    """Samples per rank per micro-step (Stage II: each sample becomes one row per expert)."""
    grad_accum: int = 1
    precision: str = "auto"
    """'fp32', 'bf16', or 'auto' (bf16 on GPU, fp32 on CPU)."""
    log_every: int = 5
    eval_every: int = 50
    """Write sample generations to TensorBoard every N steps (0 = only at the end)."""
    num_eval_samples: int = 4
    max_new_tokens: int = 48
    nan_tolerance: int = 3
    """Stop after this many consecutive non-finite losses (each is skipped with a warning)."""
    stop_after_steps: int = 0
    """Stop as if preempted (checkpoint, exit) once this many steps are done (0 = off): time-boxed jobs, tests."""


@dataclass
class CheckpointArgs:
    every: int = 50
    """Save every N steps (and always at the end)."""
    keep: int = 2
    """Keep the newest N step checkpoints."""
    resume: bool = True
    """Resume from `<run_dir>/checkpoints/latest` when it exists."""


@dataclass
class DistributedArgs:
    ep: int = 1
    """Expert-parallel size: world = ep * dp; each EP rank holds n_experts/ep experts (Stage II)."""
    backend: str = "auto"
    """'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'."""
    zero_stage: int = -1
    """Override the DeepSpeed config's ZeRO stage (-1 = keep the file's)."""


@dataclass
class TrainArgs:
    stage: int = 1
    """1 = dense (Q-Former + projection + one LoRA), 2 = MoE (experts' LoRA from a Stage I run)."""
    run_dir: str = "runs/default/stage1"
    init_from: str = ""
    """Stage II: the Stage I run directory whose final checkpoint initialises every expert."""
    seed: int = 42
    deepspeed_config: str = "ds_configs/zero2.json"
    """ZeRO/offload/communication JSON; batch sizes, precision and optimizer come from this config."""
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainLoopArgs = field(default_factory=TrainLoopArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)
    stage_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-stage dotted overrides applied when `stage` matches, e.g. {'2': {'optim.lr': 2e-4}} (YAML presets only)."""


# ---------------------------------------------------------------- merging


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to `tp` or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _check_type(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {tp}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r} ({type(value).__name__})")
        (arm,) = typing.get_args(tp)
        return [_check_type(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML reads '3e-3' (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(
                f"config key '{key}': expected {tp.__name__}, got {value!r} ({type(value).__name__})"
            )
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key '{key}': expected null, got {value!r}")
        return None
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in hints:
            valid = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key '{key}' (valid keys here: {valid})")
        tp = hints[k]
        if _is_dataclass_type(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' is a section; give a mapping, got {v!r}")
            _apply(getattr(obj, k), v, key + ".")
        else:
            setattr(obj, k, _check_type(v, tp, key))


def _dotted_to_nested(dotted: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}' conflicts with a scalar set earlier")
        node[parts[-1]] = value
    return nested


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['optim.lr=1e-4', 'model.experts=[a,b]'] -> {'optim.lr': 1e-4, ...} (values as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from None
    return out


def resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    names = sorted(x.stem for x in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config preset '{name_or_path}' not found: give a YAML path or one of {names}")


def load_config(preset: str | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainArgs:
    """Build TrainArgs from defaults, an optional preset (name or YAML path) and dotted overrides."""
    args = TrainArgs()
    file_cfg: dict[str, Any] = {}
    if preset:
        path = resolve_preset(preset)
        with open(path) as f:
            try:
                file_cfg = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(file_cfg, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config sections")
        _apply(args, file_cfg)
    dotted = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    _apply(args, _dotted_to_nested(dotted))
    # Stage-specific settings from the preset, then the CLI again so the command line always wins.
    stage_cfg = args.stage_overrides.get(str(args.stage))
    if stage_cfg:
        _apply(args, _dotted_to_nested(dict(stage_cfg)))
        _apply(args, _dotted_to_nested(dotted))
    validate(args)
    return args


def validate(args: TrainArgs) -> None:
    """Cross-field checks that need no process group (world-size checks live in the layout)."""
    m = args.model
    if args.stage not in (1, 2):
        raise ConfigError(f"config key 'stage': must be 1 or 2, got {args.stage}")
    if not m.experts:
        raise ConfigError("config key 'model.experts': at least one expert is needed")
    if len(set(m.experts)) != len(m.experts):
        raise ConfigError(f"config key 'model.experts': names must be unique, got {m.experts}")
    if args.distributed.ep < 1:
        raise ConfigError("config key 'distributed.ep': must be >= 1")
    if args.stage == 2 and len(m.experts) % args.distributed.ep:
        raise ConfigError(
            f"config key 'distributed.ep': {len(m.experts)} experts cannot be split over ep={args.distributed.ep}; "
            f"choose an ep that divides {len(m.experts)}"
        )
    if args.stage == 1 and args.distributed.ep != 1:
        raise ConfigError("config key 'distributed.ep': Stage I has one LLM, so ep must be 1")
    if args.train.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"config key 'train.precision': 'auto', 'fp32' or 'bf16', got {args.train.precision!r}")
    if m.vision.type not in ("vit", "efficientnet"):
        raise ConfigError(f"config key 'model.vision.type': 'vit' or 'efficientnet', got {m.vision.type!r}")
    if m.router != "template":
        raise ConfigError(f"config key 'model.router': only 'template' is available, got {m.router!r}")
    for k in ("steps", "micro_batch_size", "grad_accum"):
        if getattr(args.train, k) < 1:
            raise ConfigError(f"config key 'train.{k}': must be >= 1")
    if m.qformer.num_query_tokens < 1:
        raise ConfigError("config key 'model.qformer.num_query_tokens': must be >= 1")


def to_dict(args: Any) -> dict[str, Any]:
    return dataclasses.asdict(args)


def dump_config(args: TrainArgs, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(args), f, sort_keys=False)
    tmp.replace(path)


def from_dict(d: dict[str, Any]) -> TrainArgs:
    args = TrainArgs()
    _apply(args, d)
    return args


def read_config(path: str | Path) -> TrainArgs:
    """The resolved config a run wrote (`config.yaml` in a run or model directory)."""
    with open(path) as f:
        try:
            return from_dict(yaml.safe_load(f) or {})
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
