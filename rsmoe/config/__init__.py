"""Typed configuration (schema) and how it is filled (loading): defaults < YAML preset < dotted overrides."""

from rsmoe.config.loading import (
    CAPTION_PARTS,
    PRESET_DIR,
    anchor_paths,
    ROUTER_MODES,
    check_expert_parallel,
    dump_config,
    from_dict,
    load_config,
    parse_overrides,
    read_config,
    resolve_preset,
    to_dict,
    validate,
)
from rsmoe.config.schema import (
    CheckpointArgs,
    DataArgs,
    DistributedArgs,
    GenerationArgs,
    LearnedRouterArgs,
    LLMArgs,
    LoRAArgs,
    ModelArgs,
    OptimArgs,
    QFormerArgs,
    TrainArgs,
    TrainLoopArgs,
    VisionArgs,
)
from rsmoe.errors import ConfigError

__all__ = [
    "CAPTION_PARTS", "PRESET_DIR", "ROUTER_MODES", "CheckpointArgs", "ConfigError", "DataArgs", "DistributedArgs", "GenerationArgs", "LearnedRouterArgs", "LLMArgs",
    "LoRAArgs", "ModelArgs", "OptimArgs", "QFormerArgs", "TrainArgs", "TrainLoopArgs", "VisionArgs",
    "anchor_paths", "check_expert_parallel", "dump_config", "from_dict", "load_config", "parse_overrides", "read_config",
    "resolve_preset", "to_dict", "validate",
]
