"""Turns loader batches into model inputs: router prompts, tokenised rows, labels.

Stage I: one row per sample (instruction -> whole caption, or a question -> answer).
Stage II: one row per (sample, local expert): the router's prompt for that expert -> the
expert's target, its caption parts joined (`model.expert_parts`). The Q-Former always reads the
user's instruction (not the per-expert prompt), so the visual prefix is computed once per sample
and shared by all experts. With the learned router (`model.router=learned`) each prefix's
instruction also goes to the router in LLM tokens, and each question gets one row per local expert:
the routed expert trains on it, the others' rows are probes whose losses pick the route head's target.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass

import torch

from rsmoe.config import ModelArgs
from rsmoe.data.splitter import split_caption
from rsmoe.models.router import make_router

log = logging.getLogger(__name__)

# RSICap's instruction templates: Stage I sees them all, so the LLM Block follows any of them.
PROMPT_CACHE_SIZE = 4096  # distinct prompts kept tokenized (caption prompts: a few dozen)

CAPTION_INSTRUCTIONS = [
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
]


def format_prompt(text: str) -> str:
    return f"Instruction: {text.strip()}\nResponse:"


@dataclass
class Processor:
    llm_tokenizer: object
    qformer_tokenizer: object
    experts: list[str]
    max_prompt_len: int = 48
    max_target_len: int = 96
    max_instruction_len: int = 32
    caption_source: str = "caption"
    """'caption': train on each sample's caption (and its parts); 'references': on one of its human
    references drawn per step (UCM-style datasets have 5 per image; parts split from the one drawn)."""
    vqa_sampling: str = "question"
    """'question': a VQA row trains one of the sample's questions uniformly; 'type': a question type
    uniformly, then one question of it (data.vqa_sampling)."""
    router_mode: str = "template"
    """'none', 'template' or 'learned' (rsmoe.models.router)."""
    expert_parts: dict[str, list[str]] | None = None
    """expert -> the caption parts its target joins (None: the part of its own name)."""

    def __post_init__(self) -> None:
        self.router = make_router(self.router_mode, self.experts, self.expert_parts)
        self._warned_long = False
        # Prompts come from a few templates per expert: tokenize each once, not once per row. Bounded
        # (least recently used out), because question prompts are open-ended. Per instance: one tokenizer each.
        self._prompt_ids = functools.lru_cache(maxsize=PROMPT_CACHE_SIZE)(self._tokenize_prompt)
        if self.llm_tokenizer.eos_token_id is None:
            raise ValueError("the LLM tokenizer has no eos token; set one in its tokenizer_config.json")

    @classmethod
    def for_model(cls, m: ModelArgs, llm_tokenizer, qformer_tokenizer, caption_source: str = "caption",
                  vqa_sampling: str = "question") -> "Processor":
        """The processor of a model config (training, inference and evaluation build it the same way;
        `caption_source` and `vqa_sampling` (data.*) matter only to training targets)."""
        return cls(llm_tokenizer, qformer_tokenizer, list(m.experts), m.max_prompt_len, m.max_target_len,
                   m.qformer.max_instruction_len, caption_source=caption_source, vqa_sampling=vqa_sampling,
                   router_mode=m.router, expert_parts=dict(m.expert_parts))

    @property
    def learned(self) -> bool:
        return self.router.mode == "learned"

    def expert_target(self, parts: dict, expert: str) -> str:
        """The expert's Stage II target: its caption parts joined in order (empty parts left out)."""
        texts = [str(parts.get(p, "") or "").strip() for p in self.router.parts[expert]]
        return " ".join(t for t in texts if t)

    # ------------------------------------------------------------ text -> ids
    def _tokenize_prompt(self, prompt: str) -> list[int]:
        ids = self.llm_tokenizer(format_prompt(prompt), add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_len and not self._warned_long:
            log.warning("a prompt has %d tokens, cut to model.max_prompt_len=%d (its end, 'Response:', is lost): %r; "
                        "raise model.max_prompt_len", len(ids), self.max_prompt_len, prompt[:120])
            self._warned_long = True
        return ids[: self.max_prompt_len]

    def _encode_rows(self, rows: list[tuple[str, str | None]]) -> list[tuple[list[int], list[int]]]:
        """(prompt, target or None) -> (prompt ids, target ids + eos); targets in one batched tokenizer call."""
        texts = [" " + t.strip() for _, t in rows if t is not None]
        encoded = iter(self.llm_tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        eos = self.llm_tokenizer.eos_token_id
        return [(self._prompt_ids(p), [] if t is None else next(encoded)[: self.max_target_len - 1] + [eos]) for p, t in rows]

    def encode_router_instructions(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The instructions in LLM tokens, for the learned router (it averages their frozen embeddings)."""
        enc = self.llm_tokenizer(instructions, padding="longest", truncation=True, max_length=self.max_instruction_len,
                                 add_special_tokens=False, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def encode_instructions(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.qformer_tokenizer(
            instructions,
            padding="longest",
            truncation=True,
            max_length=self.max_instruction_len,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    def _pad_right(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        pad = self.llm_tokenizer.pad_token_id
        length = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (p, t) in enumerate(rows):
            seq = p + t
            ids[i, : len(seq)] = torch.tensor(seq)
            if t:
                labels[i, len(p) : len(seq)] = torch.tensor(t)
            mask[i, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    # ------------------------------------------------------------ training inputs
    def target_for(self, batch: dict, i: int, rng: random.Random) -> tuple[str, dict]:
        """(caption, parts) that sample i trains on this step."""
        caption, parts = batch["caption"][i], batch["parts"][i] or {}
        if self.caption_source == "references":
            refs = batch.get("references", [[]] * len(batch["caption"]))[i]
            if len(refs) > 1:
                choice = rng.choice(refs)
                if choice.strip() != caption.strip():
                    caption, parts = choice, split_caption(choice)
        return caption, parts

    def question_for(self, qa: list[dict], rng: random.Random) -> dict:
        """The question a VQA row trains this step (vqa_sampling)."""
        if self.vqa_sampling == "type":
            types = sorted({str(q.get("type")) for q in qa})
            if len(types) > 1:
                qtype = rng.choice(types)
                return rng.choice([q for q in qa if str(q.get("type")) == qtype])
        return rng.choice(qa)

    def instruction_for(self, batch: dict, i: int, rng: random.Random) -> str:
        given = batch.get("instruction", [None] * len(batch["caption"]))[i]
        return given or rng.choice(CAPTION_INSTRUCTIONS)

    def stage1_inputs(self, batch: dict, rng: random.Random, vqa_prob: float = 0.0,
                      question_captions: bool = False) -> dict[str, torch.Tensor]:
        """`question_captions` (train.itc_questions): also give each question row its sample's caption in
        LLM tokens ('question_caption_ids'/'_mask', empty for caption rows), for the contrastive term."""
        instructions, rows, caption_row = [], [], []
        for i, caption in enumerate(batch["caption"]):
            qa = batch.get("qa", [[]] * len(batch["caption"]))[i]
            if qa and rng.random() < vqa_prob:
                item = self.question_for(qa, rng)
                instr = self.router.question_prompt(item["question"])
                rows.append((instr, str(item["answer"])))
                caption_row.append(False)
            else:
                instr = self.instruction_for(batch, i, rng)
                rows.append((instr, self.target_for(batch, i, rng)[0]))
                caption_row.append(True)
            instructions.append(instr)
        out = self._pad_right(self._encode_rows(rows))
        out["adapter_index"] = torch.zeros(len(rows), dtype=torch.long)
        out["row_sample"] = torch.arange(len(rows))
        out["caption_row"] = torch.tensor(caption_row, dtype=torch.bool)  # for train.itc_weight
        if question_captions and not all(caption_row):
            captions = [(p, None if c else batch["caption"][i]) for i, ((p, _), c) in enumerate(zip(rows, caption_row))]
            padded = self._pad_right([([], t) for _, t in self._encode_rows(captions)])
            out["question_caption_ids"], out["question_caption_mask"] = padded["input_ids"], padded["attention_mask"]
        return self._with_visual_inputs(out, batch, instructions)

    def stage2_inputs(
        self, batch: dict, rng: random.Random, expert_ids: list[int], vqa_prob: float = 0.0
    ) -> dict[str, torch.Tensor]:
        """Rows for the experts in `expert_ids` (global ids; adapter slot = position in that list).

        An expert gets a row only where its target is non-empty (training it on empty targets
        teaches it to stop at once); if a local expert would get no row at all in this batch it keeps
        one prompt-only row without labels, so every adapter is in every forward but learns nothing
        from it. With `vqa_prob`, a sample also adds one question row
        for the expert the router sends it to, with its own visual prefix (the Q-Former reads the
        question, as at inference); the learned router adds every other local expert's answer to it as
        a probe row (`row_weight` 0). Every rank of an EP group draws the same random numbers and the
        same prefixes; only which rows it keeps depends on its experts.
        """
        instructions, visual_index, rows, slots, samples, weights = [], [], [], [], [], []
        question_rows: list[list[int]] = [[] for _ in expert_ids]
        question_prefix: list[int] = []
        empty: dict[int, tuple] = {}
        for i in range(len(batch["caption"])):
            instr = self.instruction_for(batch, i, rng)
            prefix_id = len(instructions)
            instructions.append(instr)
            visual_index.append(i)
            prompts = self.router.caption_prompts(instr)
            parts = self.target_for(batch, i, rng)[1]
            for slot, eid in enumerate(expert_ids):
                target = self.expert_target(parts, self.experts[eid])
                if not target:
                    empty.setdefault(slot, ((prompts[eid], None), prefix_id))
                    continue
                rows.append((prompts[eid], target))
                slots.append(slot)
                samples.append(prefix_id)
                weights.append(1.0)
            qa = (batch.get("qa") or [[]] * len(batch["caption"]))[i]
            if qa and vqa_prob > 0 and rng.random() < vqa_prob:
                item = self.question_for(qa, rng)
                question = self.router.question_prompt(item["question"])
                prefix_id = len(instructions)
                instructions.append(question)
                visual_index.append(i)
                eid = self.experts.index(self.router.route_question(item["question"], item.get("type")))
                if self.learned:
                    question_prefix.append(prefix_id)
                    for slot, local in enumerate(expert_ids):
                        question_rows[slot].append(len(rows))
                        rows.append((question, str(item["answer"])))
                        slots.append(slot)
                        samples.append(prefix_id)
                        weights.append(1.0 if local == eid else 0.0)
                elif eid in expert_ids:
                    rows.append((question, str(item["answer"])))
                    slots.append(expert_ids.index(eid))
                    samples.append(prefix_id)
                    weights.append(1.0)
        for slot, (row, prefix_id) in sorted(empty.items()):
            if slot not in slots:
                rows.append(row)
                slots.append(slot)
                samples.append(prefix_id)
                weights.append(1.0)
        out = self._pad_right(self._encode_rows(rows))
        out["adapter_index"] = torch.tensor(slots, dtype=torch.long)
        out["row_sample"] = torch.tensor(samples, dtype=torch.long)
        if self.learned:
            out["row_weight"] = torch.tensor(weights, dtype=torch.float32)
            out["question_rows"] = torch.tensor(question_rows, dtype=torch.long).view(len(expert_ids), len(question_prefix))
            out["question_prefix"] = torch.tensor(question_prefix, dtype=torch.long)
            out["router_input_ids"], out["router_attention_mask"] = self.encode_router_instructions(instructions)
        return self._with_visual_inputs(out, batch, instructions, visual_index)

    def _with_visual_inputs(
        self, out: dict, batch: dict, instructions: list[str], visual_index: list[int] | None = None
    ) -> dict[str, torch.Tensor]:
        out["pixel_values"] = batch["pixel_values"]  # each image once, however many prefixes read it
        if visual_index is not None and visual_index != list(range(len(batch["pixel_values"]))):
            out["prefix_image"] = torch.tensor(visual_index, dtype=torch.long)
        out["qformer_input_ids"], out["qformer_attention_mask"] = self.encode_instructions(instructions)
        return out

    # ------------------------------------------------------------ generation inputs
    def generation_rows(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids (generation continues right after each prompt)."""
        seqs = [self._prompt_ids(p) for p in prompts]
        length = max(len(s) for s in seqs)
        pad = self.llm_tokenizer.pad_token_id
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, length - len(s) :] = torch.tensor(s)
            mask[i, length - len(s) :] = 1
        return ids, mask

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.llm_tokenizer.batch_decode(ids, skip_special_tokens=True)]
