"""Instruction Router: one prompt per expert for captioning, expert choice for VQA.

The paper's router "generates specific prompts tailored for each corresponding LLM"; how is not
published. This is the deterministic template version: the user's instruction is kept (so
instruction-following still works) and each expert is told which aspect to describe. VQA questions
are routed by question type to the expert whose sub-task covers them. A learned router would
replace `route_question` (e.g. trained from which expert answers best) behind the same interface.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_CAPTION_INSTRUCTION = "Describe this remote sensing image in detail."

# What each known expert is asked to do. Unknown expert names get a generic prompt.
EXPERT_TASKS = {
    "theme": "Describe the overall scene: the kind of image and the land use or theme.",
    "objects": "Describe the objects in the image: what they are, how many, their colours and sizes.",
    "relations": "Describe how the objects are arranged: their positions and relations to each other.",
}

# Question types (RSVQA, RSIEval) and keywords -> the expert that answers.
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


@dataclass
class TemplateRouter:
    experts: list[str]

    def caption_prompts(self, instruction: str | None) -> list[str]:
        """One prompt per expert, in `experts` order."""
        instr = (instruction or DEFAULT_CAPTION_INSTRUCTION).strip()
        return [f"{instr} {EXPERT_TASKS.get(e, f'Focus on the {e}.')}" for e in self.experts]

    def route_question(self, question: str, qtype: str | None = None) -> str:
        """The expert that answers a VQA question: by its type when known, else by keywords."""
        if qtype and TYPE_TO_EXPERT.get(qtype) in self.experts:
            return TYPE_TO_EXPERT[qtype]
        q = question.lower()
        for pattern, expert in _KEYWORDS:
            if expert in self.experts and pattern.search(q):
                return expert
        return self.experts[0]

    @staticmethod
    def question_prompt(question: str) -> str:
        # Short answers score under RSVQA's exact-match protocol (as GeoChat's evaluation does).
        return f"{question.strip()} Answer the question using a single word or phrase."
