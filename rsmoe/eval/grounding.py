"""Image-grounding control: does the model's score depend on the image it is shown?

The control arm is the same evaluation with every sample's image replaced by the image of another
sample **of the same dataset**: a seeded derangement (no sample keeps its own image), defined on the
global sample index, so every rank of a multi-rank evaluation computes the same pairing and the
scores equal a single process's. The sample keeps its own instruction, questions and references;
only the pixels change. A model that ignores the image scores the same in both arms, so the paired
difference ``real - control`` (with a paired bootstrap interval: the same resample of images for
both arms) says whether the reported scores need the image at all.

Cost: one more generation pass for the VQA questions (they are asked again about the partner image).
Captions are not generated again when the sample's caption instruction equals its partner's (the
usual case: one default instruction per dataset): greedy or beam generation of one row does not
depend on the other rows of its batch, so "sample i's instruction with image j" is exactly the
caption the real arm already wrote for sample j; it is copied (``caption_reused``). Only samples
whose own instruction differs from their partner's (RSICap-style per-image instructions, or
``reuse_captions=False``) are captioned again.

A rank reads the encoded bytes (not decoded arrays) of just the partner images it needs, in one
extra pass over the shards (:func:`read_images`); each is decoded once, when used.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rsmoe.data.loader import iter_tar_groups, parse_group, preprocess_image
from rsmoe.eval.bootstrap import paired_caption_intervals, paired_cluster_intervals
from rsmoe.eval.class_mention import class_mention
from rsmoe.eval.vqa_metrics import canonical_type
from rsmoe.inference import generate as inference

log = logging.getLogger(__name__)

CONTROL = "each sample's image replaced by another image of the same dataset (seeded derangement: no sample keeps its own)"
BLIND = "cannot be told apart from a model that ignores the image"
USES = "the model uses the image on this set"
WORSE = "the control scores higher: its own image makes the model worse"
NO_INTERVAL = "no interval (--bootstrap 0)"


# ---------------------------------------------------------------- pairing


def derangement(entries: Sequence[tuple[str, str]], seed: int) -> dict[str, str]:
    """``key -> partner key`` for ``entries`` = (key, dataset) in global sample order.

    Per dataset, a seeded random order of its samples is turned into one cycle (each sample gets
    the next one's image), so no sample keeps its own image. The seed of a dataset's order is
    (``seed``, crc32 of the dataset name): the pairing does not change when other datasets are added.
    A dataset with one sample gets no partner.
    """
    by_dataset: dict[str, list[str]] = defaultdict(list)
    for key, dataset in entries:
        by_dataset[dataset].append(key)
    out: dict[str, str] = {}
    for dataset, keys in by_dataset.items():
        if len(keys) < 2:
            continue
        order = np.random.default_rng([seed, zlib.crc32(dataset.encode("utf-8"))]).permutation(len(keys))
        for a, b in zip(order, np.roll(order, -1)):
            out[keys[a]] = keys[b]
    return out


@dataclass
class ControlPlan:
    """What one rank does for the control arm."""

    partner: dict[str, str]
    """Every sample with a partner (all ranks' samples): key -> partner key."""
    caption: bool
    """Whether the task has captions (then every sample with a partner gets a control caption)."""
    generate_caption: set[str] = field(default_factory=set)
    """This rank's samples whose control caption is generated (instruction differs from the partner's)."""
    generate_vqa: set[str] = field(default_factory=set)
    """This rank's samples whose questions are asked again about the partner image."""
    images: dict[str, bytes] = field(default_factory=dict)
    """Encoded partner images this rank needs; each is dropped once used."""
    seconds: float = 0.0
    """Time spent in the control arm's generation on this rank."""


def plan_control(
    index: Sequence[Any], mine: set[str], *, task: str, instruction: str | None, seed: int, reuse_captions: bool = True
) -> ControlPlan:
    """The control plan of a rank. ``index`` entries have ``key``, ``dataset``, ``instruction``, ``n_questions``."""
    partner = derangement([(e.key, e.dataset) for e in index], seed)
    by_key = {e.key: e for e in index}
    plan = ControlPlan(partner=partner, caption=task in ("caption", "both"))
    for key in mine:
        p = partner.get(key)
        if p is None:
            continue
        own, theirs = instruction or by_key[key].instruction, instruction or by_key[p].instruction
        if plan.caption and (own != theirs or not reuse_captions):
            plan.generate_caption.add(key)
        if task in ("vqa", "both") and by_key[key].n_questions:
            plan.generate_vqa.add(key)
    return plan


def needed_images(plan: ControlPlan) -> set[str]:
    return {plan.partner[k] for k in plan.generate_caption | plan.generate_vqa}


def read_images(urls: Sequence[str], keys: set[str]) -> dict[str, bytes]:
    """Encoded image bytes of ``keys``, in one pass over the shards (stops once all are found)."""
    out: dict[str, bytes] = {}
    if not keys:
        return out
    counts: Counter[str] = Counter()
    for url in urls:
        for key, group in iter_tar_groups(url, counts):
            if key in keys and key not in out:
                s = parse_group(url, key, group, counts)
                if s is not None:
                    out[key] = s["image"]
                if len(out) == len(keys):
                    return out
    return out


# ---------------------------------------------------------------- generation


def answer_rows(trained: Any, pixels: Any, rows: list[tuple[int, Mapping[str, Any]]], batch_size: int, gen: Any) -> list[dict]:
    """Answers to ``rows`` = (image position in ``pixels``, qa dict), ``batch_size`` questions per call;
    the images of a call go through the vision encoder once each."""
    out: list[dict] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images, image_index = inference.images_once([i for i, _ in chunk])
        out += inference.answer(
            trained.model, trained.processor, pixels[images], [q["question"] for _, q in chunk],
            [q.get("type") for _, q in chunk], gen, image_index=image_index,
        )
    return out


def control_arm(trained: Any, items: list[dict[str, Any]], instructions: list[str | None], plan: ControlPlan,
                *, cap_gen: Any, vqa_gen: Any, vqa_batch_size: int, sequential: bool, device: Any) -> None:
    """Add ``item["control"]`` to every item of one batch that has a partner (in place).

    ``instructions``: each item's effective caption instruction. Reused captions are marked
    ``caption_from`` and filled by :func:`fill_reused_captions` once every rank's items are gathered.
    """
    t0 = time.perf_counter()
    try:
        _control_arm(trained, items, instructions, plan, cap_gen, vqa_gen, vqa_batch_size, sequential, device)
    finally:
        plan.seconds += time.perf_counter() - t0


def _control_arm(trained, items, instructions, plan, cap_gen, vqa_gen, vqa_batch_size, sequential, device) -> None:
    import torch

    v = trained.cfg.model.vision
    mean, std = np.asarray(v.image_mean, dtype=np.float32), np.asarray(v.image_std, dtype=np.float32)
    todo: list[tuple[int, np.ndarray]] = []  # (item position, partner pixels)
    for i, item in enumerate(items):
        key = item["key"]
        p = plan.partner.get(key)
        if p is None:
            continue
        ctrl: dict[str, Any] = {"partner": p}
        item["control"] = ctrl
        if plan.caption and key not in plan.generate_caption:
            ctrl["caption_from"] = p
        if key not in plan.generate_caption and key not in plan.generate_vqa:
            continue
        data = plan.images.pop(p, None)
        try:
            if data is None:
                raise ValueError("not found in the shards")
            todo.append((i, preprocess_image(data, v.image_size, mean, std)))
        except Exception as exc:  # PIL raises many types for corrupt data
            ctrl.pop("caption_from", None)
            ctrl["missing"] = f"partner image {p} could not be read ({exc.__class__.__name__})"
    if not todo:
        return
    pixels = torch.from_numpy(np.stack([px for _, px in todo])).to(device)
    cap = [k for k, (i, _) in enumerate(todo) if items[i]["key"] in plan.generate_caption]
    if cap:
        caps = inference.caption(trained.model, trained.processor, pixels[cap], [instructions[todo[k][0]] for k in cap],
                                 cap_gen, sequential=sequential)
        for k, c in zip(cap, caps):
            items[todo[k][0]]["control"].update(experts=dict(c["experts"]), caption=c["caption"], truncated=c["truncated"],
                                                caption_reused=False)
    rows = [(k, qa) for k, (i, _) in enumerate(todo) if items[i]["key"] in plan.generate_vqa for qa in items[i].get("qa") or []]
    if rows:
        answers = iter(answer_rows(trained, pixels, rows, vqa_batch_size, vqa_gen))
        for k, (i, _) in enumerate(todo):
            if items[i]["key"] in plan.generate_vqa:
                items[i]["control"]["qa"] = [{"prediction": a["answer"], "expert": a["expert"]}
                                             for a in (next(answers) for _ in items[i].get("qa") or [])]


def fill_reused_captions(items: list[dict[str, Any]]) -> None:
    """Copy the real arm's caption of each partner into the items whose control caption is reused."""
    by_key = {it["key"]: it for it in items}
    for it in items:
        ctrl = it.get("control")
        if not ctrl or "caption_from" not in ctrl:
            continue
        src = by_key.get(ctrl.pop("caption_from"))
        if src is None or "caption" not in src:
            ctrl["missing"] = f"partner {ctrl['partner']} was not evaluated (corrupt image)"
            continue
        ctrl.update(experts=dict(src["experts"]), caption=src["caption"], truncated=list(src["truncated"]), caption_reused=True)


# ---------------------------------------------------------------- scoring


def verdict(delta_ci: Sequence[float] | None) -> str:
    if delta_ci is None:
        return NO_INTERVAL
    lo, hi = delta_ci
    if lo <= 0.0 <= hi:
        return BLIND
    return USES if lo > 0 else WORSE


def summary(name: str, metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """One sentence per verdict, naming the metrics it applies to."""
    groups: dict[str, list[str]] = defaultdict(list)
    for m, row in metrics.items():
        groups[row["verdict"]].append(m)
    parts = []
    if groups.get(BLIND):
        parts.append(f"{', '.join(groups[BLIND])}: the real - control interval contains 0, so these scores {BLIND}.")
    if groups.get(USES):
        parts.append(f"{', '.join(groups[USES])}: the interval is above 0, so {USES}.")
    if groups.get(WORSE):
        parts.append(f"{', '.join(groups[WORSE])}: the interval is below 0; {WORSE}.")
    if groups.get(NO_INTERVAL):
        parts.append(f"{', '.join(groups[NO_INTERVAL])}: {NO_INTERVAL}, no verdict.")
    return f"{name}: " + " ".join(parts)


def _row(real: float, control: float, iv: Mapping[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"real": real, "control": control, "delta": real - control}
    if iv and "delta_ci" in iv:
        row.update(control_low=iv["control_ci"][0], control_high=iv["control_ci"][1],
                   delta_low=iv["delta_ci"][0], delta_high=iv["delta_ci"][1])
        row["verdict"] = verdict(iv["delta_ci"])
    else:
        row["verdict"] = NO_INTERVAL
    return row


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def distinct_share(captions: Sequence[str]) -> dict[str, Any]:
    """Share of distinct captions and of distinct opening sentences (1.0 = all different)."""
    n = len(captions)
    full = [" ".join(c.split()).lower() for c in captions]  # case and spacing do not make a caption distinct
    firsts = [_SENTENCE.split(c, maxsplit=1)[0] for c in full]
    return {"n": n, "distinct_captions": len(set(full)), "distinct_opening_sentences": len(set(firsts)),
            "distinct_caption_share": len(set(full)) / n if n else 0.0,
            "distinct_opening_share": len(set(firsts)) / n if n else 0.0}


def _why_missing(item: Mapping[str, Any]) -> str:
    ctrl = item.get("control")
    if not ctrl:
        return "the only sample of its dataset: no other image to swap in"
    return str(ctrl.get("missing") or "no control output")


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason, "control": CONTROL}


def caption_grounding(
    name: str,
    group: Sequence[Mapping[str, Any]],
    real_scores: Any,
    score: Callable[[dict[str, str], dict[str, list[str]]], Any],
    *,
    class_table: Mapping[str, Sequence[str]] | None,
    n_resamples: int,
    n_resamples_cider: int,
    seed: int,
) -> dict[str, Any]:
    """The grounding block of a caption section: control scores, paired deltas, distinct shares.

    ``score(candidates, references)`` scores one arm the way the real arm was scored (same
    tokenizer, METEOR settings); ``real_scores`` is the real arm's :class:`CaptionScores`.
    """
    paired = [it for it in group if (it.get("control") or {}).get("caption") is not None]
    if not paired:
        return unavailable("no sample has a control caption (a dataset of one sample has no other image to swap in)")
    ids = [it["key"] for it in paired]
    refs = {it["key"]: it["references"] for it in paired}
    control = score({it["key"]: it["control"]["caption"] for it in paired}, refs)
    real = real_scores if list(real_scores.ids) == ids else score({it["key"]: it["caption"] for it in paired}, refs)
    per_image: dict[str, tuple[list[float], list[float]]] = {}
    points: dict[str, tuple[float, float]] = {m: (real.corpus[m], control.corpus[m]) for m in real.corpus if m in control.corpus}
    if class_table is not None:
        labels = {it["key"]: it["label"] for it in paired}
        cr = class_mention({it["key"]: it["caption"] for it in paired}, labels, class_table)
        cc = class_mention({it["key"]: it["control"]["caption"] for it in paired}, labels, class_table)
        per_image["class_mention_accuracy"] = ([float(cr["correct"][k]) for k in ids], [float(cc["correct"][k]) for k in ids])
        points["class_mention_accuracy"] = (cr["accuracy"], cc["accuracy"])
    ivs = {}
    if n_resamples:
        ivs = paired_caption_intervals(real, control, per_image=per_image, n_resamples=n_resamples,
                                       n_resamples_cider=n_resamples_cider, seed=seed)
    metrics = {m: _row(r, c, ivs.get(m)) for m, (r, c) in points.items()}
    return {
        "available": True,
        "control": CONTROL,
        "seed": seed,
        "n_images": len(paired),
        "missing": {it["key"]: _why_missing(it) for it in group if it["key"] not in set(ids)},
        "reused_captions": sum(bool(it["control"].get("caption_reused")) for it in paired),
        "resampling": "images, paired: each resample scores both arms on the same images",
        "metrics": metrics,
        "distinct": {"real": distinct_share([it["caption"] for it in group]),
                     "control": distinct_share([it["control"]["caption"] for it in paired])},
        "summary": summary(name, metrics),
    }


def vqa_grounding(
    name: str, group: Sequence[Mapping[str, Any]], protocol_types: Sequence[str] | None, *, n_resamples: int, seed: int
) -> dict[str, Any]:
    """The grounding block of a VQA section. Items' qa rows and control qa rows must carry ``correct``.

    Paired cluster bootstrap: images are resampled and each brings all its questions, in both arms.
    """
    paired = [it for it in group if it.get("qa") and (it.get("control") or {}).get("qa") is not None]
    if not paired:
        return unavailable("no sample has control answers (a dataset of one sample has no other image to swap in)")
    clusters, types, real, ctrl = [], [], [], []
    for n, it in enumerate(paired):
        for qa, cqa in zip(it["qa"], it["control"]["qa"]):
            clusters.append(n)
            types.append(canonical_type(qa["type"] or "unknown"))
            real.append(float(qa["correct"]))
            ctrl.append(float(cqa["correct"]))
    t = np.asarray(types)
    specs: dict[str, list[np.ndarray]] = {"overall": [np.ones(len(t), dtype=bool)]}
    for ty in sorted(set(types)):
        specs[ty] = [t == ty]
    present = [ty for ty in (protocol_types or ()) if ty in set(types)]
    if present:
        specs["rsvqa_average_mean_of_types"] = [t == ty for ty in present]
        specs["rsvqa_average_question_weighted"] = [np.isin(t, present)]
    res = paired_cluster_intervals(clusters, real, ctrl, specs, n_resamples=max(1, n_resamples), seed=seed)
    metrics = {m: _row(v["real"], v["control"], v if n_resamples else None) for m, v in res.items()}
    return {
        "available": True,
        "control": CONTROL,
        "seed": seed,
        "n_images": len(paired),
        "n_questions": len(t),
        "missing": {it["key"]: _why_missing(it) for it in group if it.get("qa") and it["key"] not in {p["key"] for p in paired}},
        "resampling": "images, paired: each resample draws images and takes all their questions, in both arms",
        "metrics": metrics,
        "summary": summary(name, metrics),
    }
