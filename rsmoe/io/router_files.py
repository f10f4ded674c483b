"""The learned router's files: in a model directory (`final/router/`) and in an export (`router/`).

    router/<expert>.safetensors   one expert's router (rsmoe.models.router.LearnedRouter, unstacked):
        w_in (2H, d), b_in (d,)          context -> hidden: h = gelu(c @ w_in + b_in)
        w_out (d, k*H), soft_base (k, H) soft prompts: soft_base + (h @ w_out).view(k, H)
        w_route (d,), b_route ()         route logit: h . w_route + b_route (softmax over the experts)
    router/config.json (export only)     the format, sizes, expert order and how the inputs are built

One file per expert, written by the rank that holds it (as the adapters are), so expert parallelism
needs no gather to save. Its settings (`model.router`, `model.learned_router`) are in config.yaml.
This module is the only writer and reader of these files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rsmoe.errors import UserError
from rsmoe.io.fs import atomic_write_text, load_safetensors, save_safetensors

ROUTER_DIR = "router"
EXPORT_FORMAT = "rsmoe-learned-router"
EXPORT_VERSION = 1


def router_file(model_dir: Path, expert: str) -> Path:
    return Path(model_dir) / ROUTER_DIR / f"{expert}.safetensors"


def write_expert_router(model_dir: Path, expert: str, state: dict[str, torch.Tensor]) -> Path:
    path = router_file(model_dir, expert)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, path)
    return path


def slot_state(stacked: dict[str, torch.Tensor], slot: int) -> dict[str, torch.Tensor]:
    """One slot of a gathered, stacked router state ({param: (n_local, ...)})."""
    return {k: v[slot] for k, v in stacked.items()}


def load_router(model_dir: Path, router, names: list[str]) -> None:
    """Load `router/<name>.safetensors` into each slot (`names[slot]`); a clear error when one is missing."""
    missing = [n for n in names if not router_file(model_dir, n).is_file()]
    if missing:
        raise RouterFilesMissing(
            f"{model_dir} was trained with model.router=learned but lacks {ROUTER_DIR}/ files of expert(s) {missing}: "
            "the Stage II run did not finish or the directory was copied incompletely (copy the whole final/ directory)"
        )
    for slot, name in enumerate(names):
        path = router_file(model_dir, name)
        router.load_slot_state(slot, load_safetensors(path), where=str(path))


class RouterFilesMissing(UserError, FileNotFoundError):
    """A learned-router model directory without its router files."""


def export_router(router, names: list[str], out: Path, experts_exported: list[str]) -> dict[str, Any]:
    """Write `router/` of an export directory (module docstring); returns its manifest entry."""
    out.mkdir(parents=True, exist_ok=True)
    for name in experts_exported:
        save_safetensors({k: v.float() for k, v in router.slot_state(names.index(name)).items()}, out / f"{name}.safetensors")
    config = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "experts": list(experts_exported),
        "expert_order": list(names),
        "llm_hidden": router.hidden_size,
        "soft_tokens": router.soft_tokens,
        "hidden": router.width,
        "route_trained": router.route_trained(),
        "inputs": {
            "c": "concat(layer_norm(mean over queries of the visual prefix), layer_norm(mean of the base LLM's input "
                 "embeddings of the instruction's tokens, no special tokens, at most max_instruction_len)); layer_norm "
                 "without affine parameters, eps 1e-5",
            "instruction": "the caption instruction, or for VQA the question prompt (the same text the Q-Former reads)",
        },
        "outputs": {
            "soft_prompts": "soft_base + (gelu(c @ w_in + b_in) @ w_out).view(soft_tokens, llm_hidden): expert e reads "
                            "inputs_embeds = [visual prefix | its soft prompts | embedded prompt tokens]",
            "route_logit": "gelu(c @ w_in + b_in) . w_route + b_route; the expert with the largest logit answers a "
                           "question (softmax = the router's confidence); an all-zero head (route_trained false) was "
                           "never trained and rsmoe routes by question type instead",
        },
        "files": {name: f"router/{name}.safetensors" for name in experts_exported},
    }
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    return {"mode": "learned", "path": ROUTER_DIR, **{k: config[k] for k in ("format", "format_version", "soft_tokens", "hidden", "route_trained")},
            "config": f"{ROUTER_DIR}/config.json"}
