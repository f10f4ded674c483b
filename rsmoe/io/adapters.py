"""The adapter format: one expert's LoRA as a standard peft adapter directory.

    <dir>/adapter_config.json        peft LoraConfig (task CAUSAL_LM)
    <dir>/adapter_model.safetensors  base_model.model.<module path>.lora_{A,B}.weight

This module is the only writer and reader of that format; `ExpertLM.adapter_state(slot)` /
`load_adapter_state(slot, state)` move the tensors in and out of the stacked training layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rsmoe.io.fs import atomic_write_text, load_safetensors, save_safetensors

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def lora_config(experts, base_name_or_path: str = "") -> dict:
    """The adapter_config.json of `experts`' adapters (all experts share r, alpha and targets)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": experts.lora_r,
        "lora_alpha": experts.lora_alpha,
        "lora_dropout": experts.lora_dropout,
        "target_modules": sorted(experts.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_name_or_path,
        "inference_mode": True,
    }


def write_adapter(out_dir: str | Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """Write one adapter directory from its peft-layout `state` and `config` (see `lora_config`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out / WEIGHTS)
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2))
    return out


def save_expert_adapter(experts, slot: int, out_dir: str | Path, base_name_or_path: str = "") -> Path:
    """The adapter in `slot` of an ExpertLM as a peft adapter directory."""
    return write_adapter(out_dir, experts.adapter_state(slot), lora_config(experts, base_name_or_path))


def read_adapter(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_safetensors(Path(adapter_dir) / WEIGHTS)


def load_expert_adapter(experts, slot: int, adapter_dir: str | Path) -> None:
    experts.load_adapter_state(slot, read_adapter(adapter_dir), where=str(adapter_dir))


def has_adapter(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / WEIGHTS).is_file()
