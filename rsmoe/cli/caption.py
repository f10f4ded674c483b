"""Caption images with a trained RS-MoE. Plain Python: no launcher, CPU or one GPU.

    rsmoe caption data/sample/ucm_captions/images/196.png --model runs/demo/stage2
    rsmoe caption a.png b.png --model runs/demo/stage2/final --json --num-beams 3

Every expert writes its sub-caption (all experts in one batched generate call); the composed
caption joins them theme -> objects -> relations. `--model` takes a run directory (its `final/`
is used) or a model directory (`final/` or an exported copy). Images are preprocessed exactly as
in training: the run config's vision image_size / image_mean / image_std, bicubic resize.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from rsmoe.cli.common import add_generation_arguments, add_model_arguments
from rsmoe.inference.generate import caption, generation_args
from rsmoe.inference.load import Trained, check_images, load_trained, read_image
from rsmoe.logs import quiet_logging


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
    """Caption image files in batches of `batch_size`: one dict per image ({image, experts, caption, truncated})."""
    out: list[dict] = []
    for start in range(0, len(paths), max(1, batch_size)):
        chunk = paths[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([read_image(p, trained.cfg) for p in chunk]))
        results = caption(trained.model, trained.processor, pixels, [instruction] * len(chunk), gen, sequential=sequential)
        out += [{"image": p, **r} for p, r in zip(chunk, results)]
    return out


def run(ns: argparse.Namespace) -> int:
    quiet_logging()
    gen = generation_args(ns.num_beams, ns.max_new_tokens, ns.repetition_penalty)
    check_images(ns.images)
    trained = load_trained(ns.model, ns.device, ns.dtype)
    results = caption_images(trained, ns.images, ns.instruction, gen, ns.batch_size, ns.sequential)
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
