"""Typed configuration (schema) and how it is filled (loading): defaults < YAML preset < dotted overrides."""

from rsmoe.config.loading import (
    PRESET_DIR,
    anchor_paths,
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
    "PRESET_DIR", "CheckpointArgs", "ConfigError", "DataArgs", "DistributedArgs", "GenerationArgs", "LLMArgs",
    "LoRAArgs", "ModelArgs", "OptimArgs", "QFormerArgs", "TrainArgs", "TrainLoopArgs", "VisionArgs",
    "anchor_paths", "check_expert_parallel", "dump_config", "from_dict", "load_config", "parse_overrides", "read_config",
    "resolve_preset", "to_dict", "validate",
]
