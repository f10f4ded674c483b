"""`rsmoe caption`: caption images with a trained RS-MoE. Plain Python: no launcher, CPU or one GPU.

    rsmoe caption data/sample/ucm_captions/images/airplane00.png --model runs/demo/stage2
    rsmoe caption a.png b.png --model runs/demo/stage2/final --json --num-beams 3

Every expert writes its sub-caption (all experts in one batched generate call); the composed
caption joins them theme -> objects -> relations. `--model` takes a run directory (its `final/`
is used) or a model directory (`final/` or an exported copy). Images are preprocessed exactly as
in training: the run config's vision image_size / image_mean / image_std, bicubic resize.

This module also holds `load_trained`, which `rsmoe eval` and `rsmoe ask` use to load a model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rsmoe.config import TrainArgs

log = logging.getLogger(__name__)


class UserError(Exception):
    """A problem the user must fix; the CLI prints it as one line and exits with code 2."""


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


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory (uses `<run>/final`) or a model directory -> the model directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model '{path}' does not exist: give a run directory (e.g. runs/demo/stage2) or its final/ directory")
    if (p / "final" / "visual.safetensors").exists():
        p = p / "final"
    elif not (p / "visual.safetensors").exists():
        if (p / "checkpoints").is_dir() or (p / "config.yaml").exists():
            raise UserError(
                f"'{path}' is a run directory without a finished model (no final/visual.safetensors): "
                "let the training finish (rerun the same `rsmoe train` command to resume) and try again"
            )
        raise UserError(
            f"'{path}' is not an rsmoe model: it has neither visual.safetensors nor final/; "
            "give a run directory written by `rsmoe train` or its final/ directory"
        )
    if not (p / "config.yaml").exists():
        raise UserError(f"{p} has no config.yaml: it is not a complete rsmoe model directory (copy the whole final/ directory)")
    if not (p / "stage1_adapter" / "adapter_model.safetensors").exists():
        raise UserError(f"{p} has no stage1_adapter/: it is not a complete rsmoe model directory (copy the whole final/ directory)")
    return p


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
    from rsmoe.checkpoint import load_finished_stage
    from rsmoe.config import ConfigError, read_config
    from rsmoe.models import build_model
    from rsmoe.processor import Processor

    d = resolve_model_dir(path)
    try:
        cfg = read_config(d / "config.yaml")
    except ConfigError as exc:
        raise UserError(f"{d}/config.yaml cannot be read as an rsmoe config ({exc}); was it written by another rsmoe version?") from exc
    m = cfg.model
    stage = cfg.stage
    try:
        model, llm_tok, q_tok = build_model(m, cfg.seed)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"cannot build the model of {d}: {exc}") from exc
    try:
        load_finished_stage(d, model, cfg)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{d} does not match its own config.yaml ({exc})") from exc
    dev = device if isinstance(device, torch.device) else pick_device(device)
    model.to(device=dev, dtype=pick_dtype(dtype, dev))
    model.eval()
    model.requires_grad_(False)
    processor = Processor(llm_tok, q_tok, m.experts, m.max_prompt_len, m.max_target_len, m.qformer.max_instruction_len)
    log.info("loaded stage-%d model %s (experts %s) on %s", stage, d, model.expert_names, dev)
    return Trained(model, processor, cfg, d, stage, dev)


# ---------------------------------------------------------------- images


def read_image(path: str | Path, cfg: TrainArgs) -> np.ndarray:
    """File -> (3, S, S) float32, preprocessed exactly like training (rsmoe.data.loader.preprocess_image)."""
    from rsmoe.data.loader import preprocess_image

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
    from PIL import Image

    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"image '{path}' not found")
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as exc:
            raise UserError(f"cannot read image '{path}' ({type(exc).__name__}: {exc}); give a PNG/JPEG/TIFF file") from exc


# ---------------------------------------------------------------- shared options


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run directory (uses <run>/final) or a model directory")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")


def add_generation_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy decoding (default); >1 = beam search")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"generation length limit (default {max_new_tokens})")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens (default 1.0 = off)")


def generation_args(ns: argparse.Namespace, max_new_tokens: int | None = None):
    from rsmoe.inference import GenerationArgs

    if ns.num_beams < 1:
        raise UserError("--num-beams must be >= 1")
    if (max_new_tokens or ns.max_new_tokens) < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if ns.repetition_penalty <= 0:
        raise UserError("--repetition-penalty must be > 0")
    return GenerationArgs(
        max_new_tokens=max_new_tokens or ns.max_new_tokens, num_beams=ns.num_beams, repetition_penalty=ns.repetition_penalty
    )


def quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def fail(command: str, exc: Exception) -> int:
    print(f"rsmoe {command}: error: {exc}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------- rsmoe caption


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, TIFF)")
    add_model_arguments(p)
    p.add_argument("--instruction", default=None, help="captioning instruction (default: the router's)")
    add_generation_arguments(p, max_new_tokens=48)
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    p.add_argument("--sequential", action="store_true", help="run the experts one after another (baseline; default: one batched call)")
    p.add_argument("--json", action="store_true", help="print one JSON document: a list of {image, experts, caption}")


def caption_images(trained: Trained, paths: list[str], instruction: str | None, gen, batch_size: int = 8,
                   sequential: bool = False) -> list[dict]:
    from rsmoe.inference import caption

    out: list[dict] = []
    for start in range(0, len(paths), max(1, batch_size)):
        chunk = paths[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([read_image(p, trained.cfg) for p in chunk]))
        results = caption(trained.model, trained.processor, pixels, [instruction] * len(chunk), gen, sequential=sequential)
        out += [{"image": p, **r} for p, r in zip(chunk, results)]
    return out


def run(ns: argparse.Namespace) -> int:
    quiet_logging()
    try:
        gen = generation_args(ns)
        check_images(ns.images)
        trained = load_trained(ns.model, ns.device, ns.dtype)
        results = caption_images(trained, ns.images, ns.instruction, gen, ns.batch_size, ns.sequential)
    except (UserError, FileNotFoundError) as exc:
        return fail("caption", exc)
    if ns.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    for r in results:
        print(r["image"])
        width = max(len(n) for n in r["experts"])
        for name, text in r["experts"].items():
            print(f"  {name:<{width}}  {text}")
        print(f"  {'caption':<{width}}  {r['caption']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rsmoe caption", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
