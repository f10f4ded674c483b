"""Captioning and VQA with a trained RS-MoE: plain PyTorch, no DeepSpeed launcher needed.

All experts generate in ONE batched `generate` call: their prompts sit side by side as rows and
each row uses its own adapter. `sequential=True` runs the experts one after another instead
(the baseline that `bench/generate.py` compares against).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from rsmoe.config import GenerationArgs
from rsmoe.data.processor import Processor
from rsmoe.errors import UserError
from rsmoe.io.model_dir import STAGE1_EXPERT
from rsmoe.models.compose import compose_caption
from rsmoe.models.model import RSMoE
from rsmoe.models.router import DEFAULT_CAPTION_INSTRUCTION


def generation_args(num_beams: int, max_new_tokens: int, repetition_penalty: float) -> GenerationArgs:
    """Checked decoding options (each bad value named with its command-line flag)."""
    if num_beams < 1:
        raise UserError("--num-beams must be >= 1")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if repetition_penalty <= 0:
        raise UserError("--repetition-penalty must be > 0")
    return GenerationArgs(max_new_tokens=max_new_tokens, num_beams=num_beams, repetition_penalty=repetition_penalty)


def generate_kwargs(gen: GenerationArgs, processor: Processor) -> dict:
    """`GenerationArgs` as keyword arguments of transformers' `generate` (greedy or beam search)."""
    tok = processor.llm_tokenizer
    out = dict(
        max_new_tokens=gen.max_new_tokens,
        num_beams=gen.num_beams,
        do_sample=False,
        length_penalty=gen.length_penalty,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        synced_gpus=gen.synced_gpus,
    )
    if gen.repetition_penalty != 1.0:
        # Not generate(repetition_penalty=...): with inputs_embeds and left padding, transformers
        # skips each row's first <n_pad> *generated* tokens, so a row's output would depend on
        # how long the other prompts in its batch are. The prompt is embeddings, so only
        # generated tokens are penalised either way.
        out["logits_processor"] = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(float(gen.repetition_penalty))])
    return out


def _hit_limit(out: torch.Tensor, processor: Processor) -> list[bool]:
    """Per generated row: True if it never produced eos (finished rows end in eos, then padding)."""
    tok = processor.llm_tokenizer
    stop = torch.tensor(sorted({tok.eos_token_id, tok.pad_token_id}), device=out.device)
    return (~torch.isin(out, stop).any(dim=1)).tolist()


def generate_rows(model, processor, prefix, row_sample, prompts, slots, gen, sequential):
    """Prompt rows (row i reads prefix[row_sample[i]], e.g. `expert_rows`, with adapter slot slots[i])
    -> (texts, hit_limit) per row, in one batched generate (sequential: one call per adapter slot)."""
    ids, mask = processor.generation_rows(prompts)
    dev = prefix.device
    adapter_index = torch.tensor(slots, dtype=torch.long, device=dev)
    row_sample = torch.tensor(row_sample, dtype=torch.long, device=dev)
    kwargs = generate_kwargs(gen, processor)
    if not sequential:
        out = model.experts.generate(prefix[row_sample], ids.to(dev), mask.to(dev), adapter_index, **kwargs)
        return processor.decode(out), _hit_limit(out, processor)
    texts: list[str] = [""] * len(prompts)
    cut: list[bool] = [False] * len(prompts)
    for slot in sorted(set(slots)):
        rows = [i for i, s in enumerate(slots) if s == slot]
        sub_ids, sub_mask = processor.generation_rows([prompts[i] for i in rows])
        out = model.experts.generate(
            prefix[row_sample[rows]], sub_ids.to(dev), sub_mask.to(dev), adapter_index[rows], **kwargs
        )
        for i, t, c in zip(rows, processor.decode(out), _hit_limit(out, processor)):
            texts[i], cut[i] = t, c
    return texts, cut


@torch.no_grad()
def caption(
    model: RSMoE,
    processor: Processor,
    pixel_values: torch.Tensor,
    instructions: list[str | None] | None = None,
    gen: GenerationArgs | None = None,
    sequential: bool = False,
) -> list[dict]:
    """One dict per image: {'experts': {name: sub-caption}, 'caption': composed caption, 'truncated':
    [experts that stopped at max_new_tokens; their cut-off last sentence is not in the caption]}."""
    gen = gen or GenerationArgs()
    model.eval()
    b = pixel_values.shape[0]
    instr = [x or DEFAULT_CAPTION_INSTRUCTION for x in (instructions or [None] * b)]
    dev = next(model.experts.parameters()).device
    qids, qmask = processor.encode_instructions(instr)
    prefix = model.visual(pixel_values.to(dev), qids.to(dev), qmask.to(dev))
    soft, _ = router_outputs(model, processor, prefix, instr)
    names = model.expert_names
    prompts, slots, samples = [], [], []
    for i in range(b):
        if names == [STAGE1_EXPERT]:
            per_expert = [instr[i]]
        else:
            all_prompts = processor.router.caption_prompts(instr[i])
            per_expert = [all_prompts[processor.experts.index(n)] for n in names]
        for slot, p in enumerate(per_expert):
            prompts.append(p)
            slots.append(slot)
            samples.append(i)
    rows = expert_rows(model, prefix, samples, slots, soft)
    texts, cut = generate_rows(model, processor, rows, list(range(len(prompts))), prompts, slots, gen, sequential)
    results = []
    k = len(names)
    for i in range(b):
        parts = {names[s]: texts[i * k + s] for s in range(k)}
        truncated = [names[s] for s in range(k) if cut[i * k + s]]
        results.append({"experts": parts, "caption": compose_caption(parts, names, truncated), "truncated": truncated})
    return results


def router_outputs(model: RSMoE, processor: Processor, prefix: torch.Tensor, instructions: list[str]):
    """The learned router's (soft prompts, route logits) for these prefixes; (None, None) without one."""
    if getattr(model, "router", None) is None:
        return None, None
    ids, mask = processor.encode_router_instructions(instructions)
    return model.router_outputs(prefix, ids.to(prefix.device), mask.to(prefix.device))


def expert_rows(model: RSMoE, prefix: torch.Tensor, samples: list[int], slots: list[int], soft) -> torch.Tensor:
    """The per-row inputs experts read before their prompt: prefix[samples[i]], then expert slots[i]'s soft
    prompts when the router is learned."""
    dev = prefix.device
    return model.expert_rows(prefix, torch.tensor(samples, dtype=torch.long, device=dev),
                             torch.tensor(slots, dtype=torch.long, device=dev), soft)


def images_once(image_of: list[int]) -> tuple[list[int], list[int]]:
    """Each question's image -> (the distinct images, in order; each question's position among them):
    pass `pixel_values[distinct]` and `image_index=positions` to `answer` to encode every image once."""
    distinct = sorted(set(image_of))
    position = {img: k for k, img in enumerate(distinct)}
    return distinct, [position[img] for img in image_of]


@torch.no_grad()
def answer(
    model: RSMoE,
    processor: Processor,
    pixel_values: torch.Tensor,
    questions: list[str],
    types: list[str | None] | None = None,
    gen: GenerationArgs | None = None,
    image_index: list[int] | None = None,
) -> list[dict]:
    """One dict per question: {'answer', 'expert', 'route', 'confidence'}; the router picks the expert.

    `route` says how: 'learned' (the learned router's head, top-1; `confidence` = its softmax
    probability of that expert), 'type' / 'keywords' / 'default' (the template's route, also the
    fallback of an untrained head) or 'first' (`model.router=none`); `confidence` is None unless learned.
    `image_index[i]` is question i's image in `pixel_values`, so several questions about one image
    encode it once; None = one image per question."""
    gen = gen or GenerationArgs(max_new_tokens=8)
    model.eval()
    types = types or [None] * len(questions)
    dev = next(model.experts.parameters()).device
    prompts = [processor.router.question_prompt(q) for q in questions]
    qids, qmask = processor.encode_instructions(prompts)
    index = None if image_index is None else torch.tensor(image_index, dtype=torch.long, device=dev)
    prefix = model.visual(pixel_values.to(dev), qids.to(dev), qmask.to(dev), index)
    soft, logits = router_outputs(model, processor, prefix, prompts)
    experts, routes, confidence = route_questions(model, processor, questions, types, logits)
    slots = [model.expert_names.index(e) for e in experts]
    rows = expert_rows(model, prefix, list(range(len(questions))), slots, soft)
    texts, _ = generate_rows(model, processor, rows, list(range(len(questions))), prompts, slots, gen, False)
    return [{"answer": t, "expert": e, "route": r, "confidence": c} for t, e, r, c in zip(texts, experts, routes, confidence)]


def route_questions(model: RSMoE, processor: Processor, questions: list[str], types: list[str | None],
                    logits: torch.Tensor | None) -> tuple[list[str], list[str], list[float | None]]:
    """(expert, how it was chosen, confidence) per question: a Stage I model's single expert; the learned
    router's head (top-1; its softmax probability) once trained; else the template's route."""
    names = model.expert_names
    confidence: list[float | None] = [None] * len(questions)
    if names == [STAGE1_EXPERT]:
        return [STAGE1_EXPERT] * len(questions), ["stage1"] * len(questions), confidence
    if logits is not None and model.router.route_trained():
        probs = torch.softmax(logits.float(), dim=-1)
        best = probs.argmax(dim=-1)
        return ([names[int(k)] for k in best], ["learned"] * len(questions),
                [round(float(probs[i, k]), 4) for i, k in enumerate(best)])
    chosen = [processor.router.route_with_reason(q, t) for q, t in zip(questions, types)]
    return [e if e in names else names[0] for e, _ in chosen], [r for _, r in chosen], confidence
