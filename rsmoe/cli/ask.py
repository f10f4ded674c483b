"""Answer a question about an image with a trained RS-MoE (no launcher, CPU or one GPU).

    rsmoe ask data/sample/rsvqa/lr_sentinel2/images/10.png "Is a building present?" --model runs/demo/stage2
    rsmoe ask image.png "How many roads are there?" --model runs/demo/stage2 --type count --json

The instruction router picks the expert that answers: a model trained with `model.router=learned`
by its route head (its confidence is printed); otherwise by `--type` when given (presence, count,
area -> objects; comp -> relations; rural_urban -> theme), else by keywords in the question. The
question gets the same suffix as in evaluation ("Answer the question using a single word or
phrase."). A Stage I model answers with its single "llm" expert.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from rsmoe.cli.common import add_generation_arguments, add_model_arguments
from rsmoe.errors import UserError
from rsmoe.inference.generate import answer, generation_args
from rsmoe.inference.load import Trained, check_images, load_trained, read_image
from rsmoe.logs import quiet_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, TIFF)")
    p.add_argument("question", metavar="QUESTION", help="the question, quoted")
    add_model_arguments(p)
    p.add_argument("--type", default=None, help="question type (presence, count, area, comp, rural_urban, ...) to route by")
    add_generation_arguments(p, max_new_tokens=8)
    p.add_argument("--json", action="store_true", help="print {image, question, type, answer, expert, route, confidence} as JSON")


def ask(trained: Trained, image: str, question: str, qtype: str | None, gen) -> dict:
    pixels = torch.from_numpy(np.stack([read_image(image, trained.cfg)]))
    out = answer(trained.model, trained.processor, pixels, [question], [qtype], gen)[0]
    return {"image": image, "question": question, "type": qtype, "answer": out["answer"], "expert": out["expert"],
            "route": out["route"], "confidence": out["confidence"]}


def run(ns: argparse.Namespace) -> int:
    quiet_logging()
    if not ns.question.strip():
        raise UserError("the question is empty")
    gen = generation_args(ns.num_beams, ns.max_new_tokens, ns.repetition_penalty)
    check_images([ns.image])
    trained = load_trained(ns.model, ns.device, ns.dtype)
    result = ask(trained, ns.image, ns.question, ns.type, gen)
    if ns.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        conf = f", router confidence {result['confidence']:.2f}" if result["confidence"] is not None else ""
        print(f"{result['answer']}\n  (answered by expert '{result['expert']}'{conf})")
    return 0
