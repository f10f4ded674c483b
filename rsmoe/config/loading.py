"""Loading the configuration: dataclass defaults < YAML preset < dotted command-line overrides.

Presets are YAML files in `rsmoe/config/presets/` (named by stem: `tiny`, `demo`, `rsmoe-1b`,
`rsmoe-7b`) or any path. Overrides are `section.key=value`, parsed as YAML scalars/lists
(`optim.lr=1e-4`, `model.experts=[theme,objects]`). Unknown keys and wrong types fail with the key
named. `read_config` reads back the resolved `config.yaml` a run wrote.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rsmoe.config.schema import TrainArgs
from rsmoe.errors import ConfigError

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).parent / "presets"
ROUTER_MODES = ("none", "template", "learned")
# The caption parts a sample carries (rsmoe.data.schema.PARTS; the config layer sits below data).
CAPTION_PARTS = ("theme", "objects", "relations")
# Keys older rsmoe versions wrote into config.yaml and this one no longer has: dropped when a run's
# config is read back, so finished runs stay loadable. (Never accepted from presets or overrides.)
RETIRED_KEYS = {("model", "qformer", "vocab_size")}
# Filesystem paths a run records in config.yaml. They are anchored (made absolute) where the user gives
# them, so everything that reads a run back (Stage II, export --tag, eval, caption, serve) finds the same
# files from any working directory. Shard keys may hold several patterns joined by ' :: '.
RUN_PATH_KEYS = (
    ("run_dir",), ("init_from",), ("data", "train_shards"), ("data", "val_shards"),
    ("model", "llm", "path"), ("model", "llm", "tokenizer"), ("model", "vision", "path"),
    ("model", "qformer", "path"), ("model", "qformer", "bert_init"), ("model", "qformer", "tokenizer"),
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # asset:NAME, pipe:..., s3://...: not a local path


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
    anchor_paths(args, Path.cwd())
    return args


def _anchor(spec: str, base: Path, several: bool) -> str:
    if several:
        return " :: ".join(_anchor(p.strip(), base, False) for p in spec.split("::") if p.strip())
    if not spec or _SCHEME.match(spec):
        return spec
    p = os.path.expanduser(spec)
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def anchor_paths(args: TrainArgs, base: Path) -> TrainArgs:
    """Make the run's relative filesystem paths (RUN_PATH_KEYS) absolute against `base`, in place."""
    for keys in RUN_PATH_KEYS:
        node = args
        for k in keys[:-1]:
            node = getattr(node, k)
        setattr(node, keys[-1], _anchor(getattr(node, keys[-1]), base, several=keys[-1].endswith("_shards")))
    return args


def _training_cwd(config_file: Path, run_dir: str) -> Path | None:
    """Where a run that recorded a relative `run_dir` was started: the config's run directory (its own
    directory, or the parent of final/) minus `run_dir`. None when that does not fit (e.g. an export)."""
    rel = Path(os.path.normpath(run_dir)) if run_dir else None
    if rel is None or rel.is_absolute() or ".." in rel.parts:
        return None
    here = config_file.resolve().parent
    for cand in (here, here.parent):
        n = len(rel.parts)
        if len(cand.parts) > n and Path(*cand.parts[-n:]) == rel:
            return Path(*cand.parts[:-n])
    return None


def _one_of(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        listed = " or ".join(", ".join(f"'{c}'" for c in choices).rsplit(", ", 1))
        raise ConfigError(f"config key '{key}': {listed}, got {value!r}")


def validate(args: TrainArgs) -> None:
    """Cross-field checks that need no process group (world-size checks live in the layout)."""
    m = args.model
    if args.stage not in (1, 2):
        raise ConfigError(f"config key 'stage': must be 1 or 2, got {args.stage}")
    if not m.experts:
        raise ConfigError("config key 'model.experts': at least one expert is needed")
    if len(set(m.experts)) != len(m.experts):
        raise ConfigError(f"config key 'model.experts': names must be unique, got {m.experts}")
    if args.stage == 1 and args.distributed.ep != 1:
        raise ConfigError("config key 'distributed.ep': Stage I has one LLM, so ep must be 1")
    if args.stage == 2:
        check_expert_parallel(len(m.experts), args.distributed.ep)
    _one_of("train.precision", args.train.precision, ("auto", "fp32", "bf16"))
    _one_of("train.loss_normalisation", args.train.loss_normalisation, ("token", "sample"))
    _one_of("data.caption_source", args.data.caption_source, ("caption", "references"))
    _one_of("data.vqa_sampling", args.data.vqa_sampling, ("question", "type"))
    if args.optim.visual_lr_scale <= 0:
        raise ConfigError("config key 'optim.visual_lr_scale': must be > 0")
    if args.train.itc_weight < 0 or args.train.itc_bank < 0:
        raise ConfigError("config keys 'train.itc_weight' and 'train.itc_bank' must be >= 0")
    if not 0 <= args.optim.adapter_delay_steps < max(1, args.train.steps):
        raise ConfigError(f"config key 'optim.adapter_delay_steps': must be in [0, train.steps={args.train.steps}), "
                          f"got {args.optim.adapter_delay_steps}")
    _one_of("model.vision.type", m.vision.type, ("vit", "efficientnet"))
    if m.router not in ROUTER_MODES:
        raise ConfigError(f"config key 'model.router': one of {', '.join(ROUTER_MODES)}, got {m.router!r}")
    lr = m.learned_router
    if lr.soft_tokens < 0 or lr.hidden < 1 or lr.route_loss_weight < 0:
        raise ConfigError("config key 'model.learned_router': soft_tokens >= 0, hidden >= 1 and route_loss_weight >= 0 "
                          f"are needed, got {lr}")
    _validate_expert_parts(m.experts, m.expert_parts)
    _one_of("stage2_init", args.stage2_init, ("stage1", "untrained"))
    if args.stage == 2 and args.stage2_init == "untrained" and args.init_from:
        raise ConfigError(f"config key 'init_from': stage2_init=untrained starts without a Stage I run, but init_from="
                          f"{args.init_from!r} names one; drop one of the two")
    for k in ("steps", "micro_batch_size", "grad_accum", "length_groups"):
        if getattr(args.train, k) < 1:
            raise ConfigError(f"config key 'train.{k}': must be >= 1")
    if args.checkpoint.every < 0 or args.checkpoint.keep < 1:
        raise ConfigError("config keys 'checkpoint.every' (>= 0; 0 = only at the end) and 'checkpoint.keep' (>= 1) "
                          f"got {args.checkpoint.every} and {args.checkpoint.keep}")
    if args.data.feature_cache is False:  # YAML reads a bare `off` as false
        args.data.feature_cache = "off"
    if args.data.feature_cache is True or args.data.feature_cache.strip() == "":
        raise ConfigError(f"config key 'data.feature_cache': 'off', 'memory' or a directory, got {args.data.feature_cache!r}")
    if args.data.feature_cache != "off" and not args.data.feature_cache_gb > 0:
        raise ConfigError(f"config key 'data.feature_cache_gb': must be > 0, got {args.data.feature_cache_gb}")
    if m.qformer.num_query_tokens < 1:
        raise ConfigError("config key 'model.qformer.num_query_tokens': must be >= 1")


def _validate_expert_parts(experts: list[str], mapping: dict[str, Any]) -> None:
    """Every expert's target must come from known caption parts: a typo would train an expert on nothing."""
    if mapping:
        extra = sorted(set(mapping) - set(experts))
        if extra:
            raise ConfigError(f"config key 'model.expert_parts': {extra} are not in model.experts {experts}")
    for e in experts:
        parts = mapping.get(e, [e])
        if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
            raise ConfigError(f"config key 'model.expert_parts.{e}': give a non-empty list of caption parts, got {parts!r}")
        unknown = [p for p in parts if p not in CAPTION_PARTS]
        if unknown:
            hint = ("" if e in mapping else f"; expert '{e}' is not a caption part, so map it in model.expert_parts, "
                    f"e.g. model.expert_parts={{{e}: [objects, relations]}}")
            raise ConfigError(f"config key 'model.expert_parts.{e}': unknown caption part(s) {unknown} "
                              f"(parts: {', '.join(CAPTION_PARTS)}){hint}")


def check_expert_parallel(n_experts: int, ep: int, world_size: int | None = None) -> None:
    """The one check (and wording) of an expert-parallel layout: world = ep x dp, ep divides the experts."""
    if ep < 1 or n_experts % ep:
        raise ConfigError(
            f"config key 'distributed.ep': {n_experts} experts cannot be split over ep={ep}; "
            f"choose an ep that divides {n_experts}"
        )
    if world_size is not None and world_size % ep:
        raise ConfigError(
            f"config key 'distributed.ep': world size {world_size} is not a multiple of ep={ep}; "
            f"launch a multiple of {ep} ranks (world = ep x dp) or change distributed.ep"
        )


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
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config sections")
    for keys in RETIRED_KEYS:
        node = raw
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.pop(keys[-1], None) is not None:
            log.debug("%s: dropped retired key %s", path, ".".join(keys))
    try:
        args = from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}; was it written by another rsmoe version?") from None
    # Runs written before paths were anchored recorded them relative to where training started: anchor
    # them there, so an old run reads the same from any directory (left as they are when unknown).
    base = _training_cwd(Path(path), args.run_dir)
    return anchor_paths(args, base) if base is not None else args
