"""Batched generation for the server: many requests' images and experts in one `generate` call.

The same steps as `rsmoe.inference.generate.caption` / `answer` (one visual prefix per image, one row per
(image, expert), each row with its own adapter), with two things a server needs: each request may
ask for a subset of the experts (`model: "objects"` in the chat API), and a question may be sent
to a named expert instead of the router's choice. With all experts and the router, the texts are
those of `rsmoe.inference.generate` (tests/unit/test_serving.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rsmoe.config import GenerationArgs
from rsmoe.inference.generate import expert_rows, generate_rows, route_questions, router_outputs
from rsmoe.io.model_dir import STAGE1_EXPERT
from rsmoe.models.compose import compose_caption
from rsmoe.models.router import DEFAULT_CAPTION_INSTRUCTION

COMPOSED_MODEL = "rsmoe"
"""Model name of the whole mixture: composed caption / routed answer."""


@dataclass(frozen=True)
class GenSettings:
    """Hashable generation settings: jobs with equal settings can share one generate call."""

    max_new_tokens: int
    num_beams: int = 1
    repetition_penalty: float = 1.0

    def args(self) -> GenerationArgs:
        return GenerationArgs(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                              repetition_penalty=self.repetition_penalty)


@dataclass
class CaptionJob:
    pixels: np.ndarray
    """(3, S, S) float32, preprocessed."""
    instruction: str | None = None
    experts: tuple[str, ...] | None = None
    """None = every expert (and the composed caption over them)."""


@dataclass
class AnswerJob:
    pixels: np.ndarray
    question: str
    qtype: str | None = None
    expert: str | None = None
    """None = the router picks."""


class Engine:
    """Owns a loaded model; `run_group` is what the Batcher's worker thread calls.

    Not thread-safe (torch generation and the processor's prompt cache): call it from one thread."""

    def __init__(self, trained):
        self.trained = trained
        self.model = trained.model
        self.processor = trained.processor
        self.names: list[str] = list(self.model.expert_names)
        v = trained.cfg.model.vision
        self.image_size, self.image_mean, self.image_std = v.image_size, v.image_mean, v.image_std

    @property
    def stage1(self) -> bool:
        return self.names == [STAGE1_EXPERT]

    def _device(self) -> torch.device:
        return next(self.model.experts.parameters()).device

    def run_group(self, key: tuple[str, GenSettings], jobs: list) -> list[dict]:
        task, settings = key
        if task == "caption":
            return self.caption(jobs, settings.args())
        if task == "answer":
            return self.answer(jobs, settings.args())
        raise ValueError(f"unknown task {task!r}")

    # ------------------------------------------------------------ caption
    @torch.no_grad()
    def caption(self, jobs: list[CaptionJob], gen: GenerationArgs) -> list[dict]:
        model, proc, names = self.model, self.processor, self.names
        model.eval()
        dev = self._device()
        instr = [j.instruction or DEFAULT_CAPTION_INSTRUCTION for j in jobs]
        pixels = torch.from_numpy(np.stack([j.pixels for j in jobs]))
        qids, qmask = proc.encode_instructions(instr)
        prefix = model.visual(pixels.to(dev), qids.to(dev), qmask.to(dev))
        soft, _ = router_outputs(model, proc, prefix, instr)
        wanted = [list(j.experts) if j.experts else names for j in jobs]
        prompts, slots, samples = [], [], []
        for i, chosen in enumerate(wanted):
            per_expert = [instr[i]] if self.stage1 else proc.router.caption_prompts(instr[i])
            for name in chosen:
                prompts.append(per_expert[0] if self.stage1 else per_expert[proc.experts.index(name)])
                slots.append(names.index(name))
                samples.append(i)
        rows = expert_rows(model, prefix, samples, slots, soft)
        texts, cut = generate_rows(model, proc, rows, list(range(len(prompts))), prompts, slots, gen, False)
        out, row = [], 0
        for chosen in wanted:
            parts = dict(zip(chosen, texts[row : row + len(chosen)]))
            truncated = [n for n, c in zip(chosen, cut[row : row + len(chosen)]) if c]
            row += len(chosen)
            out.append({"experts": parts, "caption": compose_caption(parts, chosen, truncated), "truncated": truncated})
        return out

    # ------------------------------------------------------------ answer
    @torch.no_grad()
    def answer(self, jobs: list[AnswerJob], gen: GenerationArgs) -> list[dict]:
        """A job naming an expert goes to it (no router confidence); the others go where `answer` sends them."""
        model, proc, names = self.model, self.processor, self.names
        model.eval()
        dev = self._device()
        prompts = [proc.router.question_prompt(j.question) for j in jobs]
        pixels = torch.from_numpy(np.stack([j.pixels for j in jobs]))
        qids, qmask = proc.encode_instructions(prompts)
        prefix = model.visual(pixels.to(dev), qids.to(dev), qmask.to(dev))
        soft, logits = router_outputs(model, proc, prefix, prompts)
        routed, _, confidence = route_questions(model, proc, [j.question for j in jobs], [j.qtype for j in jobs], logits)
        experts = [j.expert or e for j, e in zip(jobs, routed)]
        confidence = [None if j.expert else c for j, c in zip(jobs, confidence)]
        slots = [names.index(e) for e in experts]
        rows = expert_rows(model, prefix, list(range(len(jobs))), slots, soft)
        texts, cut = generate_rows(model, proc, rows, list(range(len(jobs))), prompts, slots, gen, False)
        return [{"answer": t, "expert": e, "router_confidence": c, "truncated": k}
                for t, e, c, k in zip(texts, experts, confidence, cut)]
