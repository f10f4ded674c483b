"""Instruction Router: what each expert is told for captioning, and which expert answers a question.

The paper's router "generates specific prompts tailored for each corresponding LLM" ("dynamically",
"based on the input image and global instructions"); how is not published (docs/router.md). Three
modes sit behind one interface (`make_router(mode, ...)`, chosen by `model.router`):

- `none`     every expert gets the user's instruction unchanged (the paper's "without router" arm);
             no question routing either: the first expert answers every question.
- `template` (default) the instruction plus a fixed sentence per expert naming its aspect; a question
             goes to the expert whose caption parts cover its type (count -> objects, comparison ->
             relations, scene -> theme), else by keywords. Deterministic, no parameters, nothing to
             train, and the baseline every other mode is measured against: the default until an
             ablation on real data shows the learned one is better (docs/router.md).
- `learned`  the template text plus `LearnedRouter`, a small module per expert that reads the visual
             prefix and the instruction and writes soft-prompt vectors in the LLM's embedding space
             (trained with the experts' LoRA by their LM losses in Stage II), and a VQA route head
             trained toward the expert with the lowest teacher-forced answer loss. Until that head has
             trained, questions take the template's route.

Experts may join several caption parts (`model.expert_parts`, e.g. 2 experts = theme / objects +
relations); prompts and question routes follow the parts an expert covers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CAPTION_INSTRUCTION = "Describe this remote sensing image in detail."

# What each caption part's expert is asked to do. Unknown part names get a generic prompt.
EXPERT_TASKS = {
    "theme": "Describe the overall scene: the kind of image and the land use or theme.",
    "objects": "Describe the objects in the image: what they are, how many, their colours and sizes.",
    "relations": "Describe how the objects are arranged: their positions and relations to each other.",
}

# An expert covering several parts (model.expert_parts) gets one short sentence naming them all, so its
# prompt stays within max_prompt_len (the three single-part sentences together would not).
PART_ASPECTS = {"theme": "the scene", "objects": "the objects (kinds, counts, colours)", "relations": "their arrangement"}

# Question types (RSVQA, RSIEval) and keywords -> the caption part whose expert answers.
TYPE_TO_EXPERT = {
    "presence": "objects",
    "count": "objects",
    "quantity": "objects",
    "color": "objects",
    "area": "objects",
    "comp": "relations",
    "comparison": "relations",
    "re_position": "relations",
    "ab_position": "relations",
    "area_comp": "relations",
    "road_ori": "relations",
    "rural_urban": "theme",
    "scene": "theme",
    "image": "theme",
    "reasoning": "theme",
}
_KEYWORDS = [
    (re.compile(r"\b(more|less|fewer|than|larger|smaller|left|right|above|below|next to|near|between|closer)\b"), "relations"),
    (re.compile(r"\b(how many|number of|is there|are there|is a|what color|colour|color|area)\b"), "objects"),
    (re.compile(r"\b(rural|urban|scene|type of|kind of|land use|what is this)\b"), "theme"),
]


def expert_parts(experts: list[str], mapping: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """expert -> the caption parts its target joins, in order (default: the part of its own name)."""
    mapping = mapping or {}
    return {e: list(mapping.get(e, [e])) for e in experts}


@dataclass
class TemplateRouter:
    """`template` mode: fixed prompts, questions routed by type, else keywords, else the first expert."""

    experts: list[str]
    parts: dict[str, list[str]] | None = None
    mode: str = field(default="template", init=False)

    def __post_init__(self) -> None:
        self.parts = expert_parts(self.experts, self.parts)

    def caption_prompts(self, instruction: str | None) -> list[str]:
        """One prompt per expert, in `experts` order."""
        instr = (instruction or DEFAULT_CAPTION_INSTRUCTION).strip()
        return [f"{instr} {self.task(e)}" for e in self.experts]

    def task(self, expert: str) -> str:
        parts = self.parts[expert]
        if len(parts) == 1:
            return EXPERT_TASKS.get(parts[0], f"Focus on the {parts[0]}.")
        aspects = [PART_ASPECTS.get(p, f"the {p}") for p in parts]
        return f"Describe {', '.join(aspects[:-1])} and {aspects[-1]}."

    def expert_of_part(self, part: str | None) -> str | None:
        return next((e for e in self.experts if part in self.parts[e]), None)

    def route_question(self, question: str, qtype: str | None = None) -> str:
        """The expert that answers a VQA question: by its type when known, else by keywords."""
        return self.route_with_reason(question, qtype)[0]

    def route_with_reason(self, question: str, qtype: str | None = None) -> tuple[str, str]:
        """(expert, how it was chosen: 'type', 'keywords' or 'default')."""
        typed = self.expert_of_part(TYPE_TO_EXPERT.get(qtype)) if qtype else None
        if typed is not None:
            return typed, "type"
        q = question.lower()
        for pattern, part in _KEYWORDS:
            expert = self.expert_of_part(part)
            if expert is not None and pattern.search(q):
                return expert, "keywords"
        return self.experts[0], "default"

    @staticmethod
    def question_prompt(question: str) -> str:
        # Short answers score under RSVQA's exact-match protocol (as GeoChat's evaluation does).
        return f"{question.strip()} Answer the question using a single word or phrase."


@dataclass
class NoRouter(TemplateRouter):
    """`none` mode: no per-expert prompt and no question routing (the paper's "without router" arm)."""

    mode: str = field(default="none", init=False)

    def caption_prompts(self, instruction: str | None) -> list[str]:
        return [(instruction or DEFAULT_CAPTION_INSTRUCTION).strip()] * len(self.experts)

    def route_with_reason(self, question: str, qtype: str | None = None) -> tuple[str, str]:
        return self.experts[0], "first"


@dataclass
class LearnedPrompts(TemplateRouter):
    """`learned` mode, text side: the template's prompts (the soft prompts come from `LearnedRouter`,
    inside the model) and the template's route as the fallback of an untrained route head."""

    mode: str = field(default="learned", init=False)


ROUTERS = {"none": NoRouter, "template": TemplateRouter, "learned": LearnedPrompts}


def make_router(mode: str, experts: list[str], parts: dict[str, list[str]] | None = None) -> TemplateRouter:
    if mode not in ROUTERS:
        raise ValueError(f"unknown router mode {mode!r}: choose one of {', '.join(ROUTERS)}")
    return ROUTERS[mode](list(experts), parts)


# ---------------------------------------------------------------- the learned router


def _expert_generator(seed: int, expert_id: int) -> torch.Generator:
    # Seeded by the *global* expert id (as the adapters are), so an expert's router starts identical
    # whichever rank holds it.
    return torch.Generator().manual_seed(seed * 1_000_003 + expert_id * 10_007 + 7_777_777)


class LearnedRouter(nn.Module):
    """Per expert e, from one prefix (image + instruction):

        c       = [LN(mean_q visual prefix) | LN(mean instruction token embedding)]      (2H)
        h_e     = gelu(c W_in_e + b_in_e)                                                  (d)
        soft_e  = soft_base_e + (h_e W_out_e).view(k, H)       k soft-prompt vectors, read by expert e
                                                               after the visual prefix, before its prompt
        logit_e = h_e . w_route_e + b_route_e                  VQA route score (softmax over experts)

    Parameters are stacked by adapter slot, (n_local, ...), like the LoRA adapters: under expert
    parallelism a rank holds (and trains) the router of its own experts only, so nothing is
    replicated. `W_out` and the route head start at zero: a fresh router gives every prefix the same
    soft prompts and a uniform route, and an all-zero route head means "untrained" (`route_trained`).
    """

    def __init__(self, hidden_size: int, expert_ids: list[int], *, soft_tokens: int, width: int, seed: int,
                 route_loss_weight: float = 1.0, token_embeddings: torch.Tensor | None = None):
        super().__init__()
        n, h, k, d = len(expert_ids), hidden_size, soft_tokens, width
        self.expert_ids = list(expert_ids)
        self.hidden_size, self.soft_tokens, self.width = h, k, d
        self.route_loss_weight = route_loss_weight
        self.w_in = nn.Parameter(torch.zeros(n, 2 * h, d))
        self.b_in = nn.Parameter(torch.zeros(n, d))
        self.w_out = nn.Parameter(torch.zeros(n, d, k * h))
        self.soft_base = nn.Parameter(torch.zeros(n, k, h))
        self.w_route = nn.Parameter(torch.zeros(n, d))
        self.b_route = nn.Parameter(torch.zeros(n))
        self.init_slots(seed, token_embeddings)

    @torch.no_grad()
    def init_slots(self, seed: int, token_embeddings: torch.Tensor | None) -> None:
        """W_in ~ U(+-1/sqrt(2H)); soft_base = k embeddings of random vocabulary tokens (scale-matched to
        what the LLM reads), or N(0, 0.02) without an embedding table; the rest zero."""
        for slot, eid in enumerate(self.expert_ids):
            g = _expert_generator(seed, eid)
            bound = 1.0 / math.sqrt(self.w_in.shape[1])
            self.w_in[slot].copy_(torch.empty(self.w_in.shape[1:]).uniform_(-bound, bound, generator=g))
            if self.soft_tokens:
                if token_embeddings is not None:
                    ids = torch.randint(0, token_embeddings.shape[0], (self.soft_tokens,), generator=g)
                    self.soft_base[slot].copy_(token_embeddings.detach()[ids].float())
                else:
                    self.soft_base[slot].copy_(torch.randn(self.soft_base.shape[1:], generator=g) * 0.02)
        for p in (self.b_in, self.w_out, self.w_route, self.b_route):
            p.zero_()

    @property
    def n_slots(self) -> int:
        return len(self.expert_ids)

    def route_trained(self) -> bool:
        """True once the route head has moved from its all-zero start (it saw question rows)."""
        return bool(self.w_route.detach().abs().sum() > 0 or self.b_route.detach().abs().sum() > 0)

    def forward(self, prefix: torch.Tensor, instruction_embeds: torch.Tensor,
                instruction_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prefix (P,Q,H), instruction_embeds (P,L,H), mask (P,L) -> soft prompts (P, n, k, H), route logits (P, n).

        One call computes everything from this module's own parameters (no submodules), so ZeRO-3 fetches
        them once per forward, the same way on every rank."""
        dt = self.w_in.dtype
        pooled = prefix.detach().to(dt).mean(dim=1)  # the router reads the prefix; it does not train the Q-Former
        m = instruction_mask.to(dt).unsqueeze(-1)
        instr = (instruction_embeds.detach().to(dt) * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        h = self.hidden_size
        ctx = torch.cat([F.layer_norm(pooled, (h,)), F.layer_norm(instr, (h,))], dim=-1)  # (P, 2H)
        hid = F.gelu(torch.einsum("pc,ncd->pnd", ctx, self.w_in) + self.b_in)  # (P, n, d)
        soft = self.soft_base + torch.einsum("pnd,ndo->pno", hid, self.w_out).view(*hid.shape[:2], self.soft_tokens, h)
        logits = (hid * self.w_route).sum(-1) + self.b_route  # (P, n)
        return soft, logits

    # ------------------------------------------------------------ per-expert state (the file format is io's)
    PARAMS = ("w_in", "b_in", "w_out", "soft_base", "w_route", "b_route")

    def slot_state(self, slot: int) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)[slot].detach().clone() for name in self.PARAMS}

    @torch.no_grad()
    def load_slot_state(self, slot: int, state: dict[str, torch.Tensor], where: str = "router") -> None:
        for name in self.PARAMS:
            if name not in state:
                raise KeyError(f"{where}: no tensor '{name}'")
            target = getattr(self, name)[slot]
            if state[name].shape != target.shape:
                raise KeyError(f"{where}: '{name}' has shape {tuple(state[name].shape)}, this config needs "
                               f"{tuple(target.shape)} (model.learned_router / the LLM width differ)")
            target.copy_(state[name])


def route_targets(expert_losses: torch.Tensor) -> torch.Tensor:
    """(n_experts, Nq) teacher-forced answer losses -> (Nq,) the expert with the lowest loss (first on ties)."""
    return expert_losses.argmin(dim=0)
