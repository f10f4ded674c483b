"""Evaluation reports: ``results.json``, a self-contained ``report.html`` and ``report.md``.

``results`` layout (what :func:`caption_section` / :func:`vqa_section` build)::

    {"meta": {"model": ..., "dataset": ..., "setting": "zero-shot" | "fine-tuned", ...},
     "<section name>": {"metrics": {name: value}, "intervals": {name: {"low", "high", ...}},
                        "unavailable": {name: reason}, "notes": [...], ...}, ...}

Every top-level dict with a ``"metrics"`` key becomes a table; metric values are shown x100 (the
RS literature's scale) unless the section sets ``"display_scale"``. ``results.json`` holds
``results`` unchanged plus ``"items"`` (the items without image bytes).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .caption_metrics import CaptionScores
from .vqa_metrics import normalize_answer

logger = logging.getLogger(__name__)

THUMB_SIZE = 192


# --------------------------------------------------------------------------- section builders


def caption_section(
    scores: CaptionScores, intervals: Mapping[str, Any] | None = None, *, setting: str | None = None
) -> dict[str, Any]:
    """Report section for caption metrics (per-image scores kept for later analysis)."""
    section = scores.to_dict()
    section["intervals"] = dict(intervals or {})
    if setting:
        section["setting"] = setting
    return section


def vqa_section(
    accuracy: Mapping[str, Any],
    *,
    protocol: Mapping[str, Any] | None = None,
    intervals: Mapping[str, Any] | None = None,
    setting: str | None = None,
) -> dict[str, Any]:
    """Report section for VQA: per-type and overall accuracy, plus an RSVQA protocol result."""
    metrics: dict[str, float] = {"overall": accuracy["overall"]}
    metrics.update(accuracy["per_type"])
    if "count_bucketed" in accuracy:
        metrics["count_bucketed"] = accuracy["count_bucketed"]
    section: dict[str, Any] = {
        "metrics": metrics,
        "n_per_type": dict(accuracy["n_per_type"]),
        "n": accuracy["n"],
        "intervals": dict(intervals or {}),
        "notes": ["exact match after normalize_answer (see docs/evaluation.md)"],
    }
    if protocol is not None:
        metrics["rsvqa_average"] = protocol["average"]
        section["notes"].append(protocol["protocol"])
        section["protocol"] = {k: v for k, v in protocol.items() if k != "n_per_type"}
    if setting:
        section["setting"] = setting
    return section


# --------------------------------------------------------------------------- helpers


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, bytes):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _thumbnail(png: bytes | None) -> bytes | None:
    """Downscale to at most THUMB_SIZE px so the HTML stays small; raw bytes if Pillow is absent."""
    if not png:
        return None
    try:
        from PIL import Image
    except ImportError:
        return png
    try:
        with Image.open(io.BytesIO(png)) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_SIZE, THUMB_SIZE))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
            return buf.getvalue()
    except (OSError, ValueError) as exc:
        logger.warning("could not decode an item image (%s); embedding it unchanged", exc)
        return png


def _interval(iv: Any) -> tuple[float, float] | None:
    if iv is None:
        return None
    if isinstance(iv, Mapping):
        return float(iv["low"]), float(iv["high"])
    lo, hi = iv
    return float(lo), float(hi)


def _sections(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [(k, v) for k, v in results.items() if isinstance(v, Mapping) and "metrics" in v]


def _metric_rows(section: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, 95% interval) display strings."""
    scale = float(section.get("display_scale", 100.0))
    rows = []
    for name, value in section["metrics"].items():
        iv = _interval(section.get("intervals", {}).get(name))
        val = "n/a" if value is None else f"{float(value) * scale:.2f}"
        ci = "" if iv is None else f"[{iv[0] * scale:.2f}, {iv[1] * scale:.2f}]"
        rows.append((name, val, ci))
    for name, reason in section.get("unavailable", {}).items():
        rows.append((name, "unavailable", reason))
    return rows


def _qa_correct(qa: Mapping[str, Any]) -> bool:
    if "correct" in qa:
        return bool(qa["correct"])
    qtype = qa.get("type")
    gt = normalize_answer(str(qa.get("answer", "")), qtype)
    return gt != "" and normalize_answer(str(qa.get("prediction", "")), qtype) == gt


def _expert_cell(qa: Mapping[str, Any]) -> str:
    """The expert that answered, with the learned router's confidence when it chose."""
    conf = qa.get("confidence")
    return f"{qa.get('expert', '')} ({float(conf):.2f})" if conf is not None else str(qa.get("expert", ""))


def _md(text: Any) -> str:
    """Make text safe inside a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- writers


def _render_md(results: Mapping[str, Any], items: Sequence[Mapping[str, Any]], thumbs: list[str | None]) -> str:
    lines = ["# RS-MoE evaluation report", ""]
    meta = results.get("meta")
    if isinstance(meta, Mapping):
        lines += [f"- **{_md(k)}**: {_md(v)}" for k, v in meta.items()] + [""]
    for name, sec in _sections(results):
        scale = float(sec.get("display_scale", 100.0))
        title = name + (f" ({sec['setting']})" if sec.get("setting") else "")
        lines += [f"## {_md(title)}", "", f"| metric | value (x{scale:g}) | 95% CI / note |", "|---|---:|---|"]
        lines += [f"| {_md(m)} | {v} | {_md(ci)} |" for m, v, ci in _metric_rows(sec)]
        lines.append("")
        for note in sec.get("notes", []):
            lines.append(f"- {note}")
        if sec.get("tokenizer"):
            lines.append(f"- tokenizer: {sec['tokenizer']}")
        lines.append("")
    lines += ["## Items", ""]
    for item, thumb in zip(items, thumbs):
        lines += [f"### {_md(item.get('key', ''))}", ""]
        if thumb:
            lines += [f"![{_md(item.get('key', ''))}]({thumb})", ""]
        experts = item.get("experts") or {}
        if experts:
            lines += ["| expert | sub-caption |", "|---|---|"]
            lines += [f"| {_md(n)} | {_md(t)} |" for n, t in experts.items()] + [""]
        if item.get("caption") is not None:
            lines += [f"**Composed caption:** {item['caption']}", ""]
        refs = item.get("references") or []
        if refs:
            lines += ["**References:**", ""] + [f"{i}. {r}" for i, r in enumerate(refs, 1)] + [""]
        qas = item.get("qa") or []
        if qas:
            lines += ["| question | type | expert (router confidence) | prediction | answer | correct |", "|---|---|---|---|---|---|"]
            for qa in qas:
                lines.append(
                    f"| {_md(qa.get('question', ''))} | {_md(qa.get('type', ''))} | {_md(_expert_cell(qa))} "
                    f"| {_md(qa.get('prediction', ''))} | {_md(qa.get('answer', ''))} | {'yes' if _qa_correct(qa) else 'no'} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
.item{display:flex;gap:1em;border-top:1px solid #ddd;padding:1em 0}.item img{flex:none;width:192px;height:auto}
.ok{color:#176f2c}.bad{color:#b00020}.muted{color:#777}
"""


def _render_html(results: Mapping[str, Any], items: Sequence[Mapping[str, Any]], thumbs: list[bytes | None]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>RS-MoE evaluation report</title>",
           f"<style>{_CSS}</style></head><body><h1>RS-MoE evaluation report</h1>"]
    meta = results.get("meta")
    if isinstance(meta, Mapping):
        out.append("<ul>" + "".join(f"<li><b>{e(str(k))}</b>: {e(str(v))}</li>" for k, v in meta.items()) + "</ul>")
    for name, sec in _sections(results):
        scale = float(sec.get("display_scale", 100.0))
        title = name + (f" ({sec['setting']})" if sec.get("setting") else "")
        out.append(f"<h2>{e(title)}</h2><table><tr><th>metric</th><th>value (x{scale:g})</th><th>95% CI / note</th></tr>")
        for m, v, ci in _metric_rows(sec):
            out.append(f"<tr><td>{e(m)}</td><td class='num'>{e(v)}</td><td>{e(ci)}</td></tr>")
        out.append("</table>")
        notes = list(sec.get("notes", [])) + ([f"tokenizer: {sec['tokenizer']}"] if sec.get("tokenizer") else [])
        if notes:
            out.append("<ul class='muted'>" + "".join(f"<li>{e(str(n))}</li>" for n in notes) + "</ul>")
    out.append("<h2>Items</h2>")
    for item, thumb in zip(items, thumbs):
        out.append("<div class='item'>")
        if thumb:
            out.append(f"<img alt='{e(str(item.get('key', '')))}' src='data:image/png;base64,{base64.b64encode(thumb).decode()}'>")
        out.append(f"<div><h3>{e(str(item.get('key', '')))}</h3>")
        experts = item.get("experts") or {}
        if experts:
            out.append("<table><tr><th>expert</th><th>sub-caption</th></tr>")
            out += [f"<tr><td>{e(str(n))}</td><td>{e(str(t))}</td></tr>" for n, t in experts.items()]
            out.append("</table>")
        if item.get("caption") is not None:
            out.append(f"<p><b>Composed caption:</b> {e(str(item['caption']))}</p>")
        refs = item.get("references") or []
        if refs:
            out.append("<p><b>References:</b></p><ol>" + "".join(f"<li>{e(str(r))}</li>" for r in refs) + "</ol>")
        qas = item.get("qa") or []
        if qas:
            out.append("<table><tr><th>question</th><th>type</th><th>expert (router confidence)</th><th>prediction</th><th>answer</th><th>correct</th></tr>")
            for qa in qas:
                ok = _qa_correct(qa)
                cells = [qa.get("question", ""), qa.get("type", ""), _expert_cell(qa), qa.get("prediction", ""), qa.get("answer", "")]
                out.append(
                    "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells)
                    + f"<td class='{'ok' if ok else 'bad'}'>{'yes' if ok else 'no'}</td></tr>"
                )
            out.append("</table>")
        out.append("</div></div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(out_dir: str | Path, results: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Path]:
    """Write ``results.json``, ``report.html`` (self-contained, base64 thumbnails) and ``report.md``.

    ``items``: ``{"key", "image_png": bytes | None, "experts": {name: text}, "caption": str,
    "references": [str], "qa": [{"question", "type", "prediction", "answer", "expert"}]}``; all
    keys but ``key`` are optional. A QA row may carry ``"correct"``; otherwise it is recomputed
    with :func:`normalize_answer`. The Markdown report links thumbnails written to ``thumbs/``.

    Returns ``{"json": path, "html": path, "md": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    thumbs = [_thumbnail(it.get("image_png")) for it in items]

    md_thumbs: list[str | None] = []
    for i, (item, thumb) in enumerate(zip(items, thumbs)):
        if thumb is None:
            md_thumbs.append(None)
            continue
        (out / "thumbs").mkdir(exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(item.get("key", "")))[:60]
        rel = f"thumbs/{i:05d}_{safe}.png"
        (out / rel).write_bytes(thumb)
        md_thumbs.append(rel)

    payload = dict(results)
    payload.setdefault("items", [{k: v for k, v in it.items() if k != "image_png"} for it in items])
    paths = {"json": out / "results.json", "html": out / "report.html", "md": out / "report.md"}
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["html"].write_text(_render_html(results, items, thumbs), encoding="utf-8")
    paths["md"].write_text(_render_md(results, items, md_thumbs), encoding="utf-8")
    logger.info("wrote evaluation report to %s", out)
    return paths
