"""Loading a trained RS-MoE for inference (plain PyTorch: no launcher, CPU or one GPU), and reading
images exactly as training preprocessed them. Used by `rsmoe caption/ask/eval/serve`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rsmoe.config import ConfigError, TrainArgs
from rsmoe.data.loader import preprocess_image
from rsmoe.data.processor import Processor
from rsmoe.errors import UserError
from rsmoe.io import model_dir
from rsmoe.models.build import build_model

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- model loading


@dataclass
class Trained:
    model: torch.nn.Module
    processor: object
    cfg: TrainArgs
    model_dir: Path
    stage: int
    device: torch.device

    @property
    def experts(self) -> list[str]:
        return list(self.model.expert_names)


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if name != "cpu":
        raise UserError(f"unknown device '{name}': use cpu, cuda or auto")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"unknown dtype '{name}': use auto, fp32, bf16 or fp16")
    return table[name]


def load_trained(path: str | Path, device: str | torch.device = "auto", dtype: str = "auto") -> Trained:
    """Build the model of a finished stage from its `final/config.yaml` and load its weights.

    A Stage II directory (has `adapters/`) gets every expert's adapter; a Stage I directory gives
    the single "llm" expert.
    """
    d = model_dir.resolve(path)
    try:
        cfg = model_dir.run_config(d)
    except ConfigError as exc:
        raise UserError(f"{d}/config.yaml cannot be read as an rsmoe config ({exc})") from exc
    m = cfg.model
    stage = cfg.stage
    try:
        model, llm_tok, q_tok = build_model(m, cfg.seed, fresh=False)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"cannot build the model of {d}: {exc}") from exc
    try:
        model_dir.load_finished_stage(d, model, cfg)
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{d} does not match its own config.yaml ({exc})") from exc
    dev = device if isinstance(device, torch.device) else pick_device(device)
    model.to(device=dev, dtype=pick_dtype(dtype, dev))
    model.eval()
    model.requires_grad_(False)
    processor = Processor.for_model(m, llm_tok, q_tok)
    log.info("loaded stage-%d model %s (experts %s) on %s", stage, d, model.expert_names, dev)
    return Trained(model, processor, cfg, d, stage, dev)


# ---------------------------------------------------------------- images


def read_image(path: str | Path, cfg: TrainArgs) -> np.ndarray:
    """File -> (3, S, S) float32, preprocessed exactly like training (rsmoe.data.loader.preprocess_image)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"image '{path}' not found")
    v = cfg.model.vision
    try:
        return preprocess_image(
            p.read_bytes(), v.image_size, np.asarray(v.image_mean, np.float32), np.asarray(v.image_std, np.float32)
        )
    except Exception as exc:  # PIL raises many types for unreadable files
        raise UserError(f"cannot read image '{path}' ({type(exc).__name__}: {exc}); give a PNG/JPEG/TIFF file") from exc


def check_images(paths: list[str]) -> None:
    """Fail before the (slow) model load when an image cannot be opened."""
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"image '{path}' not found")
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as exc:
            raise UserError(f"cannot read image '{path}' ({type(exc).__name__}: {exc}); give a PNG/JPEG/TIFF file") from exc
