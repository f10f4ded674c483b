"""Scoring a trained RS-MoE on shards (captioning and VQA) and writing the report (behind `rsmoe eval`).

Captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE reported unavailable offline) against the
sample's `references` (its `caption` when it has none). VQA: exact-match accuracy per question
type and overall; RSVQA-LR/HR samples (by their `dataset` field) also get the literature's
protocol average (LR: presence, comparison, rural_urban; HR: presence, comparison; count and area
apart; both the mean of the type accuracies and the question-weighted average). Class datasets
(UCM-Captions) also get class-mention accuracy. Each dataset gets its own section, labelled
zero-shot or fine-tuned. 95% bootstrap intervals. Writes results.json, report.html and report.md
(every image: the experts' sub-captions, the composed caption, the references, the VQA rows) and
prints the tables.

Image-grounding control (on by default, rsmoe.eval.grounding): the same evaluation with every
image swapped for another image of its dataset; each section reports real - control with a
paired bootstrap interval and says in words whether the scores can be told apart from a model
that ignores the image.

Distributed: under torchrun / srun each rank evaluates a disjoint share of the samples (the
loader's eval mode: sample i goes to rank i % world_size) with a plain model (no DeepSpeed
engine); rank 0 gathers the generations, checks that every sample arrived exactly once, and
scores. Scores equal a single-process run's: items are put back in shard order before scoring.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from rsmoe.config import read_config
from rsmoe.data.loader import build_loader, expand_shards, iter_tar_groups, parse_group
from rsmoe.data.shards import read_manifest
from rsmoe.distributed import collectives
from rsmoe.distributed.env import init_object_group
from rsmoe.errors import UserError
from rsmoe.eval import grounding
from rsmoe.eval.bootstrap import caption_intervals, rsvqa_average_ci, vqa_intervals
from rsmoe.eval.caption_metrics import java_status, score_captions
from rsmoe.eval.class_mention import add_class_mention
from rsmoe.eval.grounding import (
    CONTROL,
    answer_rows,
    control_arm,
    fill_reused_captions,
    needed_images,
    plan_control,
    read_images,
)
from rsmoe.eval.report import (
    caption_section,
    grounding_lines,
    vqa_section,
    write_report,
)
from rsmoe.eval.vqa_metrics import (
    RSVQA_PROTOCOLS,
    normalize_answer,
    rsvqa_protocol,
    vqa_accuracy,
)
from rsmoe.inference import generate as inference
from rsmoe.inference.generate import generation_args
from rsmoe.inference.load import Trained, load_trained, pick_device

log = logging.getLogger("rsmoe.eval")

PROTOCOL_BY_DATASET = {"RSVQA-LR": "LR", "RSVQA-HR": "HR"}


@dataclass
class EvalOptions:
    model: str
    shards: str
    task: str = "both"
    """'caption', 'vqa' or 'both'."""
    protocol: str = "auto"
    """'auto' (RSVQA-LR/HR protocol by the samples' dataset), 'rsvqa-lr', 'rsvqa-hr' (for every dataset) or 'none'."""
    out: str | None = None
    """Report folder; default <run>/eval/<shard folder name>."""
    batch_size: int = 8
    vqa_batch_size: int = 32
    num_beams: int = 1
    max_new_tokens: int = 48
    vqa_max_new_tokens: int = 8
    repetition_penalty: float = 1.0
    limit: int = 0
    """Evaluate only the first N samples of the shards (in shard order); 0 = all."""
    questions_per_image: int = 0
    """Score only the first N questions of each image; 0 = all."""
    setting: str | None = None
    """'zero-shot' / 'fine-tuned' for every dataset; None = per dataset, from the run's training manifest."""
    bootstrap: int = 1000
    seed: int = 0
    meteor: bool = True
    device: str = "auto"
    dtype: str = "auto"
    instruction: str | None = None
    sequential: bool = False
    num_workers: int = 0
    thumbnails: bool = True
    java: bool | None = None
    """None = detect (tests pass False to simulate a machine without Java)."""
    progress: bool = True
    grounding_control: bool = True
    """Also evaluate with every image swapped for another image of its dataset (rsmoe.eval.grounding)."""
    reuse_control_captions: bool = True
    """Copy a control caption from the real arm when the instructions match (exact; False = generate it, for tests)."""


# ---------------------------------------------------------------- the sample index


@dataclass(frozen=True)
class IndexEntry:
    index: int
    """Global sample index (every sample group of every shard, valid or not, in shard order)."""
    key: str
    dataset: str
    label: str | None
    """The record's scene class, if it has one (UCM-Captions)."""
    instruction: str | None
    n_questions: int


def scan_index(urls: Sequence[str], limit: int = 0) -> list[IndexEntry]:
    """Every valid record, in the loader's eval order, with what the evaluator needs before generating.

    The global index counts every sample group of every shard, valid or not (as the loader's eval
    mode does), so `index % world_size` is the rank that evaluates it. Images are not decoded.
    """
    out: list[IndexEntry] = []
    index = 0
    counts: Counter[str] = Counter()
    for url in urls:
        for key, group in iter_tar_groups(url, counts):
            if limit and index >= limit:
                return out
            s = parse_group(url, key, group, counts)
            if s is not None:
                rec = s["record"]
                out.append(IndexEntry(index, key, rec["dataset"], rec.get("label"), rec.get("instruction"), len(rec["qa"])))
            index += 1
    return out


def scan_keys(urls: Sequence[str], limit: int = 0) -> list[tuple[int, str, str]]:
    """(global index, key, dataset) of every valid record, in the loader's eval order (see scan_index)."""
    return [(e.index, e.key, e.dataset) for e in scan_index(urls, limit)]


# ---------------------------------------------------------------- setting (zero-shot / fine-tuned)


def training_datasets(model_dir: Path) -> set[str] | None:
    """Datasets this model (both stages) was trained on, from the shard manifests; None if unknown."""
    seen: set[str] = set()
    cfg_files = [model_dir / "config.yaml"]
    init = read_config(cfg_files[0]).init_from
    if init:
        for cand in (Path(init) / "final" / "config.yaml", Path(init) / "config.yaml"):
            if cand.exists():
                cfg_files.append(cand)
                break
        else:
            return None
    for f in cfg_files:
        patterns = read_config(f).data.train_shards
        for pat in [p.strip() for p in patterns.split("::") if p.strip()]:
            manifest = read_manifest(Path(pat).parent)
            if manifest is None or "datasets" not in manifest:
                return None
            seen |= {d for d, splits in manifest["datasets"].items() if splits.get("train")}
    return seen


def settings_for(datasets: list[str], model_dir: Path, forced: str | None) -> dict[str, str]:
    if forced:
        return {d: forced for d in datasets}
    trained_on = training_datasets(model_dir)
    if trained_on is None:
        return {d: "unspecified (pass --setting)" for d in datasets}
    return {d: "fine-tuned" if d in trained_on else "zero-shot" for d in datasets}


# ---------------------------------------------------------------- generation


def _thumbnail(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> bytes:
    """The model's input image, un-normalised, as a PNG of at most 192 px (for the report)."""
    from PIL import Image

    arr = pixels.float().numpy().transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    im = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8))
    im.thumbnail((192, 192))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def generate_items(trained: Trained, batch: dict, opts: EvalOptions, cap_gen, vqa_gen, control=None) -> list[dict[str, Any]]:
    """One report item per sample of `batch`: expert sub-captions, composed caption, VQA rows, and
    with a `control` plan (rsmoe.eval.grounding.ControlPlan) the same with each image swapped."""
    n = len(batch["key"])
    items: list[dict[str, Any]] = [
        {"key": batch["key"][i], "dataset": batch["dataset"][i], "references": list(batch["references"][i])} for i in range(n)
    ]
    pixels = batch["pixel_values"]
    instr = [opts.instruction or x for x in batch["instruction"]]
    if opts.task in ("caption", "both"):
        caps = inference.caption(trained.model, trained.processor, pixels, instr, cap_gen, sequential=opts.sequential)
        for item, c in zip(items, caps):
            item["experts"], item["caption"], item["truncated"] = dict(c["experts"]), c["caption"], c["truncated"]
    if opts.task in ("vqa", "both"):
        rows = []
        for i in range(n):
            qas = batch["qa"][i][: opts.questions_per_image] if opts.questions_per_image else batch["qa"][i]
            rows += [(i, q) for q in qas]
            items[i]["qa"] = []
        for (i, q), a in zip(rows, answer_rows(trained, pixels, rows, opts.vqa_batch_size, vqa_gen)):
            items[i]["qa"].append({"question": q["question"], "type": q.get("type", ""), "answer": q["answer"],
                                   "prediction": a["answer"], "expert": a["expert"],
                                   "route": a.get("route"), "confidence": a.get("confidence")})
    if control is not None:
        control_arm(trained, items, instr, control, cap_gen=cap_gen, vqa_gen=vqa_gen, vqa_batch_size=opts.vqa_batch_size,
                    sequential=opts.sequential, device=pixels.device)
    if opts.thumbnails:
        v = trained.cfg.model.vision
        for i, item in enumerate(items):
            item["image_png"] = _thumbnail(pixels[i], v.image_mean, v.image_std)
    return items


# ---------------------------------------------------------------- scoring


def score_items(items: list[dict[str, Any]], opts: EvalOptions, settings: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Report sections (see rsmoe.eval.report) for every dataset, plus 'all' when there are several."""
    sections: dict[str, Any] = {}
    warnings: list[str] = []
    datasets = sorted({it["dataset"] for it in items})
    groups = [(d, [it for it in items if it["dataset"] == d]) for d in datasets]
    if len(datasets) > 1:
        groups.append(("all", items))

    def label(name: str) -> str:
        return settings[name] if name in settings else ", ".join(sorted({settings[d] for d in datasets}))

    if opts.task in ("caption", "both"):
        java_ok, java_reason = java_status(opts.java)
        use_meteor = opts.meteor and java_ok
        if opts.meteor and not java_ok:
            warnings.append(f"METEOR unavailable ({java_reason}); BLEU, ROUGE-L and CIDEr are still reported")
        meteor = None
        if use_meteor:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()  # one JVM for every section
        try:
            def score(cands: dict[str, str], refs: dict[str, list[str]]):
                return score_captions(cands, refs, use_meteor=opts.meteor, java=opts.java if java_ok else False, meteor=meteor)

            for name, group in groups:
                cands = {it["key"]: it["caption"] for it in group}
                scores = score(cands, {it["key"]: it["references"] for it in group})
                intervals = {}
                if opts.bootstrap:
                    intervals = caption_intervals(scores, n_resamples=opts.bootstrap,
                                                  n_resamples_cider=max(1, opts.bootstrap // 5), seed=opts.seed)
                sec = caption_section(scores, intervals, setting=label(name))
                sec["dataset"] = name
                table = add_class_mention(sec, group, n_resamples=opts.bootstrap, seed=opts.seed)  # class datasets only
                if opts.grounding_control:
                    sec["grounding"] = grounding.caption_grounding(
                        f"caption/{name}", group, scores, score, class_table=table,
                        n_resamples=opts.bootstrap, n_resamples_cider=max(1, opts.bootstrap // 5), seed=opts.seed)
                sections[f"caption/{name}"] = sec
        finally:
            if meteor is not None:
                proc = meteor.meteor_p
                if proc.stdin:
                    proc.stdin.close()
                proc.kill()
                proc.wait()

    if opts.task in ("vqa", "both"):
        # Mark each row in the items (both arms), so the report does not recompute it differently.
        for it in items:
            control_rows = (it.get("control") or {}).get("qa") or []
            for qa, cqa in zip(it.get("qa") or [], control_rows):
                cqa["correct"] = _correct(cqa["prediction"], qa["answer"], qa["type"])
            for qa in it.get("qa") or []:
                qa["correct"] = _correct(qa["prediction"], qa["answer"], qa["type"])
        for name, group in groups:
            rows = [(f"{it['key']}#{j}", qa) for it in group for j, qa in enumerate(it.get("qa") or [])]
            if not rows:
                continue
            preds = {k: qa["prediction"] for k, qa in rows}
            answers = {k: qa["answer"] for k, qa in rows}
            types = {k: qa["type"] or "unknown" for k, qa in rows}
            acc = vqa_accuracy(preds, answers, types)
            split = None
            if opts.protocol in ("rsvqa-lr", "rsvqa-hr"):
                split = opts.protocol[-2:].upper()
            elif opts.protocol == "auto" and name != "all":
                split = PROTOCOL_BY_DATASET.get(name.upper())
            protocol = None
            intervals = vqa_intervals(acc, n_resamples=opts.bootstrap, seed=opts.seed) if opts.bootstrap else {}
            if split is not None:
                try:
                    protocol = rsvqa_protocol(preds, answers, types, split)
                    if opts.bootstrap:
                        for key, weighting in (("rsvqa_average_mean_of_types", "types"), ("rsvqa_average_question_weighted", "questions"),
                                               ("rsvqa_average", "types")):
                            lo, hi = rsvqa_average_ci(acc, split, weighting=weighting, n_resamples=opts.bootstrap, seed=opts.seed)
                            intervals[key] = {"low": lo, "high": hi, "method": "questions resampled within each protocol type",
                                              "n_resamples": opts.bootstrap}
                    if protocol["missing_types"]:
                        warnings.append(f"vqa/{name}: no {protocol['missing_types']} questions; RSVQA-{split} average over the rest")
                except ValueError as exc:
                    warnings.append(f"vqa/{name}: RSVQA-{split} protocol not applied ({exc})")
            sec = vqa_section(acc, protocol=protocol, intervals=intervals, setting=label(name))
            sec["dataset"] = name
            if opts.grounding_control:
                sec["grounding"] = grounding.vqa_grounding(f"vqa/{name}", group, RSVQA_PROTOCOLS[split] if protocol else None,
                                                           n_resamples=opts.bootstrap, seed=opts.seed)
            sections[f"vqa/{name}"] = sec
    return sections, warnings


def _correct(prediction: str, answer: str, qtype: str) -> bool:
    t = qtype or "unknown"
    gt = normalize_answer(answer, t)
    return gt != "" and normalize_answer(prediction, t) == gt


# ---------------------------------------------------------------- main flow


def default_out_dir(model_dir: Path, shards: str) -> Path:
    first = shards.split("::")[0].strip()
    name = Path(first).parent.name or "shards"
    split = Path(first).name.split("-")[0].replace("*", "") or "eval"
    return model_dir.parent / "eval" / f"{name}-{split}"


def evaluate(opts: EvalOptions) -> dict[str, Any] | None:
    """Run the evaluation; returns the results dict on rank 0 (None on other ranks)."""
    if opts.task not in ("caption", "vqa", "both"):
        raise UserError(f"--task must be caption, vqa or both, not '{opts.task}'")
    if opts.protocol not in ("auto", "rsvqa-lr", "rsvqa-hr", "none"):
        raise UserError(f"--protocol must be auto, rsvqa-lr, rsvqa-hr or none, not '{opts.protocol}'")
    if opts.batch_size < 1 or opts.vqa_batch_size < 1:
        raise UserError("--batch-size and --vqa-batch-size must be >= 1")
    info = init_object_group()
    rank, local_rank, world = info.rank, info.local_rank, info.world_size
    t0 = time.time()
    try:
        urls = sorted(expand_shards([p.strip() for p in opts.shards.split("::") if p.strip()]))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    index = scan_index(urls, opts.limit)
    if not index:
        raise UserError(f"no valid sample in {len(urls)} shard(s) matching '{opts.shards}' (see the warnings above)")
    dup = [k for k, n in Counter(e.key for e in index).items() if n > 1]
    if dup:
        raise UserError(f"sample key(s) {dup[:3]} occur more than once in '{opts.shards}': keys must be unique to be scored")
    mine = {e.key for e in index if e.index % world == rank}
    control = None
    if opts.grounding_control:
        control = plan_control(index, mine, task=opts.task, instruction=opts.instruction, seed=opts.seed,
                               reuse_captions=opts.reuse_control_captions)
        control.images = read_images(urls, needed_images(control))  # encoded bytes; partners may be another rank's

    device = pick_device(opts.device, local_rank)
    trained = load_trained(opts.model, device, opts.dtype)
    cap_gen = generation_args(opts.num_beams, opts.max_new_tokens, opts.repetition_penalty)
    vqa_gen = generation_args(opts.num_beams, opts.vqa_max_new_tokens, opts.repetition_penalty)
    v = trained.cfg.model.vision
    loader = build_loader(urls, batch_size=opts.batch_size, image_size=v.image_size, image_mean=tuple(v.image_mean),
                          image_std=tuple(v.image_std), rank=rank, world_size=world, num_workers=opts.num_workers)

    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    bar = tqdm(total=len(mine), unit="img", desc=f"eval ({world} rank{'s' if world > 1 else ''})",
               disable=rank != 0 or not opts.progress, dynamic_ncols=True, file=sys.stderr)
    for batch in loader:
        keep = [i for i, k in enumerate(batch["key"]) if k in mine and k not in seen]
        if keep:
            sub = {k: ([batch[k][i] for i in keep] if isinstance(batch[k], list) else batch[k][keep]) for k in batch}
            sub["pixel_values"] = sub["pixel_values"].to(device)
            items += generate_items(trained, sub, opts, cap_gen, vqa_gen, control)
            seen.update(sub["key"])
            bar.update(len(keep))
        if seen >= mine:
            break  # --limit: the rest of the shards is not ours to evaluate
    bar.close()
    corrupt = loader.stats().get("corrupt_image", 0)
    control_s = control.seconds if control is not None else 0.0

    gathered: list[tuple[list[dict[str, Any]], int, float]] = collectives.all_gather_object((items, corrupt, control_s))
    if rank != 0:
        return None

    all_items = [it for part, _, _ in gathered for it in part]
    corrupt_total = sum(c for _, c, _ in gathered)
    keys = [it["key"] for it in all_items]
    dups = [k for k, n in Counter(keys).items() if n > 1]
    if dups:
        raise RuntimeError(f"samples evaluated more than once across ranks: {dups[:5]}")
    order = {e.key: n for n, e in enumerate(index)}
    missing = [k for k in order if k not in set(keys)]
    if len(missing) > corrupt_total:
        raise RuntimeError(f"{len(missing)} sample(s) were not evaluated (only {corrupt_total} had corrupt images): {missing[:5]}")
    if missing:
        log.warning("%d sample(s) skipped for corrupt images: %s", len(missing), missing[:5])
    all_items.sort(key=lambda it: order[it["key"]])
    labels = {e.key: e.label for e in index if e.label is not None}
    for it in all_items:
        if it["key"] in labels:
            it["label"] = labels[it["key"]]
    if control is not None:
        fill_reused_captions(all_items)
    gen_s = time.time() - t0

    datasets = sorted({it["dataset"] for it in all_items})
    settings = settings_for(datasets, trained.model_dir, opts.setting)
    t_score = time.time()
    sections, warnings = score_items(all_items, opts, settings)
    score_s = time.time() - t_score
    for w in warnings:
        log.warning("%s", w)
    meta = {
        "model": str(trained.model_dir),
        "stage": trained.stage,
        "experts": trained.experts,
        "shards": opts.shards,
        "n_shards": len(urls),
        "n_images": len(all_items),
        "n_questions": sum(len(it.get("qa") or []) for it in all_items),
        "datasets": datasets,
        "setting": settings,
        "task": opts.task,
        "protocol": opts.protocol,
        "generation": {"num_beams": opts.num_beams, "max_new_tokens": opts.max_new_tokens,
                       "vqa_max_new_tokens": opts.vqa_max_new_tokens, "repetition_penalty": opts.repetition_penalty,
                       "decoding": "greedy" if opts.num_beams == 1 else f"beam search ({opts.num_beams} beams)",
                       "experts": "in turn" if opts.sequential else "one batched generate call"},
        "caption_instruction": opts.instruction or "the sample's instruction, else the router's default",
        "vqa_prompt": trained.processor.router.question_prompt("<question>"),
        "router": trained.cfg.model.router if trained.stage == 2 else "none (Stage I: one LLM)",
        "limit": opts.limit,
        "questions_per_image": opts.questions_per_image,
        "bootstrap_resamples": opts.bootstrap,
        "bootstrap_seed": opts.seed,
        "world_size": world,
        "device": str(device),
        "skipped_corrupt_images": missing,
        "generation_seconds": round(gen_s, 2),
        "scoring_seconds": round(score_s, 2),
        "grounding_control": _control_meta(all_items, opts, gathered),
        "warnings": warnings,
    }
    results = {"meta": meta, **sections}
    out = Path(opts.out) if opts.out else default_out_dir(trained.model_dir, opts.shards)
    paths = write_report(out, results, all_items)
    results["_paths"] = {k: str(p) for k, p in paths.items()}
    return results


def _control_meta(items: list[dict[str, Any]], opts: EvalOptions, gathered: list) -> dict[str, Any]:
    if not opts.grounding_control:
        return {"enabled": False}

    ctrls = [it["control"] for it in items if it.get("control")]
    return {
        "enabled": True,
        "control": CONTROL,
        "seed": opts.seed,
        "captions_generated": sum(c.get("caption_reused") is False for c in ctrls),
        "captions_reused": sum(bool(c.get("caption_reused")) for c in ctrls),
        "questions_asked": sum(len(c.get("qa") or []) for c in ctrls),
        "missing": {it["key"]: it["control"]["missing"] for it in items if (it.get("control") or {}).get("missing")},
        "generation_seconds": round(max(s for _, _, s in gathered), 2),
    }


# ---------------------------------------------------------------- printing


def format_tables(results: dict[str, Any]) -> str:
    lines = []
    for name, sec in results.items():
        if not isinstance(sec, dict) or "metrics" not in sec:
            continue
        n = f"{sec['n_images']} images" if "n_images" in sec else f"{sec.get('n', 0)} questions"
        lines.append(f"{name}  ({sec.get('setting', '')}, {n})")
        lines.append(f"  {'metric':<32}{'x100':>8}  95% CI")
        for metric, value in sec["metrics"].items():
            iv = sec.get("intervals", {}).get(metric)
            ci = f"[{iv['low'] * 100:6.2f}, {iv['high'] * 100:6.2f}]" if iv else ""
            count = sec.get("n_per_type", {}).get(metric)
            extra = f"  (n={count})" if count is not None else ""
            lines.append(f"  {metric:<32}{value * 100:>8.2f}  {ci}{extra}")
        for metric, reason in sec.get("unavailable", {}).items():
            lines.append(f"  {metric:<32}{'n/a':>8}  {reason}")
        if sec.get("grounding"):
            lines += ["  " + line for line in grounding_lines(sec["grounding"])]
        lines.append("")
    return "\n".join(lines)
