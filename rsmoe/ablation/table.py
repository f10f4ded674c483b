"""The ablation table: one row per arm, from each arm's `rsmoe eval` results.json.

Columns: caption metrics (BLEU-4, METEOR, ROUGE-L, CIDEr) with the evaluation's own 95% bootstrap
intervals; CIDEr and VQA accuracy minus the reference arm's, with a *paired* bootstrap interval (the
same images / questions resampled for both arms: the arms share the test set, so the difference is
much tighter than two separate intervals suggest); VQA accuracy overall and per question type; the
image-grounding control (real minus swapped-image score, paired interval; distinct captions) when the
evaluation ran it; wall time of each arm.
Written as Markdown and JSON, plus a plot when matplotlib is installed (`pip install rsmoe[plot]`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rsmoe.ablation.arms import Arm
from rsmoe.ablation.plot import plot_arms
from rsmoe.eval.bootstrap import cider_on_subset
from rsmoe.eval.caption_metrics import score_captions
from rsmoe.io.fs import atomic_write_text

log = logging.getLogger("rsmoe.ablate")

CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


# ---------------------------------------------------------------- reading one arm's results


def eval_results(eval_dir: Path) -> dict[str, Any] | None:
    """The results.json of a finished evaluation; None when absent or cut short."""
    try:
        return json.loads((eval_dir / "results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _section(results: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    """`<kind>/all` when the evaluation covered several datasets, else its one `<kind>/<dataset>`."""
    if f"{kind}/all" in results:
        return results[f"{kind}/all"]
    found = [v for k, v in results.items() if k.startswith(f"{kind}/") and isinstance(v, Mapping) and "metrics" in v]
    return found[0] if len(found) == 1 else None


def _cell(section: Mapping[str, Any] | None, metric: str) -> dict[str, Any] | None:
    if not section or section.get("metrics", {}).get(metric) is None:
        return None
    iv = (section.get("intervals") or {}).get(metric) or {}
    cell = {"value": float(section["metrics"][metric]), "low": iv.get("low"), "high": iv.get("high")}
    n = (section.get("n_per_type") or {}).get(metric)
    if n is not None:
        cell["n"] = int(n)
    return cell


GROUNDING_METRICS = {"caption": ("BLEU-4", "CIDEr"), "vqa": ("overall",)}


def grounding(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The image-grounding control (rsmoe eval's `grounding` block of the caption and VQA sections):
    real minus swapped-image score with its paired interval, plus the share of distinct captions.

    An evaluation run with --no-grounding-control, or one whose control was unavailable, gives {}."""
    out: dict[str, dict[str, Any]] = {}
    distinct = None
    for kind, metrics in GROUNDING_METRICS.items():
        block = (_section(results, kind) or {}).get("grounding")
        if not isinstance(block, Mapping) or not block.get("available"):
            continue
        for metric in metrics:
            row = (block.get("metrics") or {}).get(metric)
            if isinstance(row, Mapping) and isinstance(row.get("delta"), (int, float)) and math.isfinite(row["delta"]):
                out[f"{kind} {metric}"] = {"value": float(row["delta"]), "low": row.get("delta_low"),
                                           "high": row.get("delta_high"), "verdict": row.get("verdict")}
        if kind == "caption":
            distinct = (block.get("distinct") or {}).get("real")
    if isinstance(distinct, Mapping) and distinct.get("n"):  # last: the cell reads deltas first
        out["distinct captions"] = {"count": int(distinct["distinct_captions"]), "n": int(distinct["n"])}
    return out


def _grounding_cell(g: Mapping[str, Any]) -> str:
    parts = [f"{k}: {v['count']}/{v['n']}" if "count" in v else f"{k}: {_fmt(v, signed=True)}" for k, v in g.items()]
    return "; ".join(parts) or "–"


def _captions(results: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, list[str]]]:
    cands, refs = {}, {}
    for it in results.get("items") or []:
        if it.get("caption") is not None and it.get("references"):
            cands[it["key"]], refs[it["key"]] = it["caption"], list(it["references"])
    return cands, refs


def _correct(results: Mapping[str, Any]) -> dict[str, float]:
    return {f"{it['key']}#{j}": float(bool(qa.get("correct"))) for it in results.get("items") or []
            for j, qa in enumerate(it.get("qa") or [])}


def _routing(results: Mapping[str, Any]) -> dict[str, Any] | None:
    """Which expert answered, per question type, and how the route was chosen (learned / type / ...)."""
    rows = [qa for it in results.get("items") or [] for qa in it.get("qa") or []]
    if not rows:
        return None
    per_type: dict[str, dict[str, int]] = {}
    for qa in rows:
        per_type.setdefault(qa.get("type") or "unknown", {}).setdefault(str(qa.get("expert")), 0)
        per_type[qa.get("type") or "unknown"][str(qa.get("expert"))] += 1
    routes: dict[str, int] = {}
    for qa in rows:
        routes[str(qa.get("route"))] = routes.get(str(qa.get("route")), 0) + 1
    conf = [qa["confidence"] for qa in rows if qa.get("confidence") is not None]
    return {"expert_per_type": per_type, "route": routes,
            "mean_confidence": round(float(np.mean(conf)), 4) if conf else None}


# ---------------------------------------------------------------- paired differences
# CIDEr resamples are n_resamples // 5, as in `rsmoe eval` (each recomputes corpus CIDEr twice).


def paired_cider_delta(arm: Mapping[str, Any], ref: Mapping[str, Any], *, n_resamples: int, seed: int = 0) -> dict[str, Any] | None:
    """CIDEr(arm) - CIDEr(reference) on their common images, with a paired percentile bootstrap
    (corpus CIDEr recomputed on every resample, both arms on the same resampled images)."""
    from pycocoevalcap.cider.cider_scorer import cook_refs, cook_test

    a_c, a_r = _captions(arm)
    b_c, _ = _captions(ref)
    ids = sorted(set(a_c) & set(b_c))
    if not ids:
        return None
    refs = {k: a_r[k] for k in ids}
    sa = score_captions({k: a_c[k] for k in ids}, refs, use_meteor=False)
    sb = score_captions({k: b_c[k] for k in ids}, refs, use_meteor=False)
    ta = [cook_test(sa.tokenized_candidates[k]) for k in ids]
    tb = [cook_test(sb.tokenized_candidates[k]) for k in ids]
    rr = [cook_refs(sa.tokenized_references[k]) for k in ids]
    point = float(sa.corpus["CIDEr"] - sb.corpus["CIDEr"])
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(ids), len(ids))
        deltas.append(cider_on_subset(ta, rr, idx) - cider_on_subset(tb, rr, idx))
    lo, hi = np.quantile(deltas, [0.025, 0.975])
    return {"value": point, "low": float(lo), "high": float(hi), "n": len(ids), "n_resamples": n_resamples,
            "method": "paired bootstrap over images, corpus CIDEr recomputed per resample"}


def paired_vqa_delta(arm: Mapping[str, Any], ref: Mapping[str, Any], *, n_resamples: int, seed: int = 0) -> dict[str, Any] | None:
    a, b = _correct(arm), _correct(ref)
    ids = sorted(set(a) & set(b))
    if not ids:
        return None
    d = np.array([a[k] - b[k] for k in ids])
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (n_resamples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"value": float(d.mean()), "low": float(lo), "high": float(hi), "n": len(ids), "n_resamples": n_resamples,
            "method": "paired bootstrap over questions"}


# ---------------------------------------------------------------- the table


def build_table(out: Path, arms: list[Arm], timings: Mapping[str, Any], *, reference: str, n_resamples: int = 200,
                config: str = "") -> dict[str, Any]:
    results = {a.name: eval_results(out / a.name / "eval") for a in arms}
    ref = results.get(reference)
    vqa_types: list[str] = []
    for r in results.values():
        sec = _section(r or {}, "vqa")
        for t in (sec or {}).get("n_per_type", {}):
            if t not in vqa_types:
                vqa_types.append(t)
    rows = []
    for arm in arms:
        r = results[arm.name]
        row: dict[str, Any] = {"arm": arm.name, "title": arm.title, "factor": arm.factor, "overrides": list(arm.overrides),
                               "two_stage": arm.two_stage, "experts": list(arm.experts),
                               "results": str(out / arm.name / "eval" / "results.json")}
        train_s = (timings.get(f"{arm.name}/train") or {}).get("seconds")
        eval_s = (timings.get(f"{arm.name}/eval") or {}).get("seconds")
        row["seconds"] = {"train": train_s, "eval": eval_s}
        if r is None:
            row["missing"] = "no results.json (the arm has not been evaluated)"
            rows.append(row)
            continue
        cap, vqa = _section(r, "caption"), _section(r, "vqa")
        row["n_images"] = (cap or {}).get("n_images")
        row["n_questions"] = (vqa or {}).get("n")
        row["caption"] = {m: _cell(cap, m) for m in CAPTION_METRICS}
        row["vqa"] = {m: _cell(vqa, m) for m in ["overall", *vqa_types]}
        row["grounding"] = grounding(r)
        row["routing"] = _routing(r)
        if ref is not None and arm.name != reference:
            row["delta_vs_reference"] = {
                "CIDEr": paired_cider_delta(r, ref, n_resamples=max(1, n_resamples // 5)) if cap else None,
                "vqa_overall": paired_vqa_delta(r, ref, n_resamples=n_resamples) if vqa else None,
            }
        rows.append(row)
    meta = next((r["meta"] for r in results.values() if r and "meta" in r), {})
    return {"config": config, "reference": reference, "eval_shards": meta.get("shards"), "n_images": meta.get("n_images"),
            "n_questions": meta.get("n_questions"), "stage1_seconds": (timings.get("stage1") or {}).get("seconds"),
            "vqa_types": vqa_types, "rows": rows}


def _fmt(cell: Mapping[str, Any] | None, scale: float = 100.0, signed: bool = False) -> str:
    if not cell or cell.get("value") is None:
        return "–"
    v = cell["value"] * scale
    text = f"{v:+.2f}" if signed else f"{v:.2f}"
    if cell.get("low") is not None and cell.get("high") is not None:
        text += f" [{cell['low'] * scale:.2f}, {cell['high'] * scale:.2f}]"
    return text


def to_markdown(table: Mapping[str, Any]) -> str:
    types = list(table["vqa_types"])
    has_grounding = any(r.get("grounding") for r in table["rows"])
    head = ["arm", *CAPTION_METRICS, "Δ CIDEr vs ref.", "VQA overall", "Δ VQA vs ref.", *types]
    if has_grounding:
        head.append("grounding: real - swapped image")
    head += ["train s", "eval s"]
    lines = [f"# Ablation ({table.get('config') or 'config'})", "",
             f"Every arm scored on {table.get('n_images')} images / {table.get('n_questions')} questions of "
             f"`{table.get('eval_shards')}`; values x100 with 95% bootstrap intervals; Δ = arm minus the reference "
             f"arm (`{table['reference']}`), paired bootstrap over the same images / questions. "
             f"Shared Stage I: {table.get('stage1_seconds')} s.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        if "missing" in r:
            lines.append(f"| {r['title']} | " + " | ".join(["–"] * (len(head) - 1)) + " |")
            continue
        d = r.get("delta_vs_reference") or {}
        cells = [r["title"], *[_fmt(r["caption"].get(m)) for m in CAPTION_METRICS],
                 _fmt(d.get("CIDEr"), signed=True) if d else "(reference)",
                 _fmt(r["vqa"].get("overall")), _fmt(d.get("vqa_overall"), signed=True) if d else "(reference)",
                 *[_fmt(r["vqa"].get(t)) for t in types]]
        if has_grounding:
            g = r.get("grounding") or {}
            cells.append(_grounding_cell(g))
        s = r.get("seconds") or {}
        cells += [f"{s['train']:.0f}" if s.get("train") is not None else "kept", f"{s['eval']:.0f}" if s.get("eval") is not None else "kept"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Arms (Stage II overrides on top of the preset):", ""]
    lines += [f"- `{r['arm']}`: {', '.join(f'`{o}`' for o in r['overrides']) or 'none (the reference)'}"
              + ("" if r["two_stage"] else "; no Stage I, trained for both stages' steps") for r in table["rows"]]
    routed = [r for r in table["rows"] if r.get("routing")]
    if routed:
        lines += ["", "VQA routing (questions answered per expert; how the expert was chosen):", ""]
        for r in routed:
            rt = r["routing"]
            conf = f", mean router confidence {rt['mean_confidence']:.2f}" if rt.get("mean_confidence") is not None else ""
            per = "; ".join(f"{t}: " + ", ".join(f"{e} {n}" for e, n in sorted(c.items())) for t, c in rt["expert_per_type"].items())
            lines.append(f"- `{r['arm']}` ({', '.join(f'{k} {v}' for k, v in rt['route'].items())}{conf}): {per}")
    return "\n".join(lines) + "\n"


def write_table(out: Path, table: dict[str, Any], *, plot: bool = True) -> dict[str, Path | None]:
    paths: dict[str, Path | None] = {"md": out / "ablation.md", "json": out / "ablation.json", "png": None}
    note = None
    if plot:
        paths["png"], note = plot_arms(table, out / "ablation.png")
    if note:
        table["plot"] = note
    atomic_write_text(paths["json"], json.dumps(table, indent=2, default=str) + "\n")
    md = to_markdown(table)
    if note:
        md += f"\n{note}\n"
    elif paths["png"] is not None:
        md += "\n![arms](ablation.png)\n"
    atomic_write_text(paths["md"], md)
    return paths
