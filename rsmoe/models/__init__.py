"""RS-MoE model components. Nothing in this package imports DeepSpeed."""

from rsmoe.models.compose import compose_caption
from rsmoe.models.experts import ExpertLM
from rsmoe.models.lora import MultiLoRALinear
from rsmoe.models.router import TemplateRouter
from rsmoe.models.rsmoe import RSMoE, VisualPrefix, build_model

__all__ = [
    "ExpertLM",
    "MultiLoRALinear",
    "RSMoE",
    "TemplateRouter",
    "VisualPrefix",
    "build_model",
    "compose_caption",
]
