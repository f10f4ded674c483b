"""Evaluation reports: ``results.json``, a self-contained ``report.html`` and ``report.md``.

``results`` layout (what :func:`caption_section` / :func:`vqa_section` build)::

    {"meta": {"model": ..., "dataset": ..., "setting": "zero-shot" | "fine-tuned", ...},
     "<section name>": {"metrics": {name: value}, "intervals": {name: {"low", "high", ...}},
                        "unavailable": {name: reason}, "notes": [...], ...}, ...}

Every top-level dict with a ``"metrics"`` key becomes a table; metric values are shown x100 (the
RS literature's scale) unless the section sets ``"display_scale"``. A section's ``"grounding"``
block (rsmoe.eval.grounding) becomes a second table: real, control, real - control with intervals
and the verdict in words. ``results.json`` holds
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
        # Papers average RSVQA types differently: report both, labelled; "rsvqa_average" keeps its
        # original meaning (the mean of the type accuracies).
        metrics["rsvqa_average_mean_of_types"] = protocol["average_mean_of_types"]
        metrics["rsvqa_average_question_weighted"] = protocol["average_question_weighted"]
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


def _display_size(png: bytes) -> tuple[int, int] | None:
    """Width and height to draw a thumbnail at: its longest side THUMB_SIZE px, its aspect ratio kept."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(png)) as im:
            w, h = im.size
    except (ImportError, OSError, ValueError):
        return None
    if w < 1 or h < 1:
        return None
    k = THUMB_SIZE / max(w, h)
    return max(1, round(w * k)), max(1, round(h * k))


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


def _fmt(value: Any, scale: float) -> str:
    return "n/a" if value is None else f"{float(value) * scale:.2f}"


def _grounding_rows(g: Mapping[str, Any], scale: float) -> list[tuple[str, str, str, str, str, str]]:
    """(metric, real, control, control 95% CI, real - control, its 95% CI and verdict) display strings."""
    rows = []
    for name, r in g.get("metrics", {}).items():
        cci = f"[{_fmt(r['control_low'], scale)}, {_fmt(r['control_high'], scale)}]" if "control_low" in r else ""
        dci = f"[{_fmt(r['delta_low'], scale)}, {_fmt(r['delta_high'], scale)}]" if "delta_low" in r else ""
        rows.append((name, _fmt(r["real"], scale), _fmt(r["control"], scale), cci, f"{float(r['delta']) * scale:+.2f}",
                     f"{dci} {r['verdict']}".strip()))
    return rows


def _distinct_line(g: Mapping[str, Any]) -> str | None:
    d = g.get("distinct")
    if not d:
        return None
    r, c = d["real"], d["control"]
    return (f"distinct captions: real {r['distinct_captions']}/{r['n']} ({100 * r['distinct_caption_share']:.1f}%), "
            f"control {c['distinct_captions']}/{c['n']} ({100 * c['distinct_caption_share']:.1f}%); distinct opening "
            f"sentences: real {r['distinct_opening_sentences']}/{r['n']}, control {c['distinct_opening_sentences']}/{c['n']}")


def _grounding_notes(g: Mapping[str, Any]) -> list[str]:
    n = f"{g['n_images']} images" + (f", {g['n_questions']} questions" if "n_questions" in g else "")
    notes = [f"control: {g['control']} (seed {g['seed']}); {n}; resampling: {g['resampling']}"]
    if g.get("reused_captions"):
        notes.append(f"{g['reused_captions']} control captions copied from the real arm (same instruction, same image: "
                     "the same generation)")
    if g.get("missing"):
        shown = "; ".join(f"{k}: {why}" for k, why in list(g["missing"].items())[:5])
        notes.append(f"no control for {len(g['missing'])} sample(s), left out of this comparison ({shown})")
    line = _distinct_line(g)
    return notes + ([line] if line else [])


def grounding_lines(g: Mapping[str, Any], scale: float = 100.0) -> list[str]:
    """The grounding block as plain text lines (for the printed tables)."""
    if not g.get("available"):
        return [f"grounding control: not available ({g.get('reason', '')})"]
    lines = [f"image-grounding control ({g['control']})",
             f"  {'metric':<32}{'real':>8}{'control':>9}{'real-ctrl':>10}  95% CI of real-ctrl, verdict"]
    for name, real, ctrl, _, delta, verdict in _grounding_rows(g, scale):
        lines.append(f"  {name:<32}{real:>8}{ctrl:>9}{delta:>10}  {verdict}")
    lines += ["  " + n for n in _grounding_notes(g)[1:]]
    lines.append(g["summary"])
    return lines


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
        g = sec.get("grounding")
        if g:
            lines += [f"### {_md(name)}: image-grounding control", ""]
            if not g.get("available"):
                lines += [f"Not available: {_md(g.get('reason', ''))}", ""]
            else:
                lines += [f"**{_md(g['summary'])}**", "",
                          f"| metric | real (x{scale:g}) | control | control 95% CI | real - control | 95% CI, verdict |",
                          "|---|---:|---:|---|---:|---|"]
                lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in _grounding_rows(g, scale)]
                lines += [""] + [f"- {_md(n)}" for n in _grounding_notes(g)] + [""]
    lines += ["## Items", ""]
    for item, thumb in zip(items, thumbs):
        lines += [f"### {_md(item.get('key', ''))}", ""]
        if thumb:
            lines += [f"![{_md(item.get('key', ''))}]({thumb})", ""]
        experts = item.get("experts") or {}
        if experts:
            lines += ["| expert | sub-caption |", "|---|---|"]
            lines += [f"| {_md(n)} | {_md(t)} |" for n, t in experts.items()] + [""]
        if item.get("label"):
            lines += [f"**Class:** {_md(item['label'])}", ""]
        if item.get("caption") is not None:
            lines += [f"**Composed caption:** {item['caption']}", ""]
        ctrl = item.get("control") or {}
        if ctrl.get("caption") is not None:
            lines += [f"**Control caption** (image of {_md(ctrl['partner'])}): {ctrl['caption']}", ""]
        elif ctrl.get("missing"):
            lines += [f"**Control:** {_md(ctrl['missing'])}", ""]
        refs = item.get("references") or []
        if refs:
            lines += ["**References:**", ""] + [f"{i}. {r}" for i, r in enumerate(refs, 1)] + [""]
        qas = item.get("qa") or []
        if qas:
            cqas = ctrl.get("qa") or []
            head = "| question | type | expert (router confidence) | prediction | answer | correct |" + (" control prediction | control correct |" if cqas else "")
            lines += [head, "|---|---|---|---|---|---|" + ("---|---|" if cqas else "")]
            for j, qa in enumerate(qas):
                extra = ""
                if cqas:
                    cqa = cqas[j]
                    extra = f" {_md(cqa.get('prediction', ''))} | {'yes' if _qa_correct({**qa, **cqa}) else 'no'} |"
                lines.append(
                    f"| {_md(qa.get('question', ''))} | {_md(qa.get('type', ''))} | {_md(_expert_cell(qa))} "
                    f"| {_md(qa.get('prediction', ''))} | {_md(qa.get('answer', ''))} | {'yes' if _qa_correct(qa) else 'no'} |" + extra
                )
            lines.append("")
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}td:first-child{white-space:nowrap}
.item{display:flex;gap:1em;border-top:1px solid #ddd;padding:1em 0}.item>div:not(.thumb){flex:1;min-width:0;overflow-x:auto}
.verdict{font-weight:600}
.ok{color:#176f2c}.bad{color:#b00020}.muted{color:#777}
""" + f".thumb{{flex:none;width:{THUMB_SIZE}px}}.thumb img{{display:block;max-width:100%;height:auto}}\n"


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
        g = sec.get("grounding")
        if g:
            out.append(f"<h3>{e(name)}: image-grounding control</h3>")
            if not g.get("available"):
                out.append(f"<p>Not available: {e(str(g.get('reason', '')))}</p>")
            else:
                out.append(f"<p class='verdict'>{e(g['summary'])}</p>")
                out.append(f"<table><tr><th>metric</th><th>real (x{scale:g})</th><th>control</th><th>control 95% CI</th>"
                           "<th>real - control</th><th>95% CI, verdict</th></tr>")
                for row in _grounding_rows(g, scale):
                    out.append("<tr>" + "".join(f"<td class='num'>{e(c)}</td>" if k in (1, 2, 4) else f"<td>{e(c)}</td>"
                                                for k, c in enumerate(row)) + "</tr>")
                out.append("</table><ul class='muted'>" + "".join(f"<li>{e(n)}</li>" for n in _grounding_notes(g)) + "</ul>")
    out.append("<h2>Items</h2>")
    for item, thumb in zip(items, thumbs):
        out.append("<div class='item'>")
        if thumb:
            size = _display_size(thumb)
            dims = f" width='{size[0]}' height='{size[1]}'" if size else ""
            # A fixed-width column holds the image, so the flex row cannot stretch it; width/height
            # attributes plus height:auto keep its aspect ratio.
            out.append(f"<div class='thumb'><img alt='{e(str(item.get('key', '')))}'{dims} "
                       f"src='data:image/png;base64,{base64.b64encode(thumb).decode()}'></div>")
        out.append(f"<div><h3>{e(str(item.get('key', '')))}</h3>")
        experts = item.get("experts") or {}
        if experts:
            out.append("<table><tr><th>expert</th><th>sub-caption</th></tr>")
            out += [f"<tr><td>{e(str(n))}</td><td>{e(str(t))}</td></tr>" for n, t in experts.items()]
            out.append("</table>")
        if item.get("label"):
            out.append(f"<p><b>Class:</b> {e(str(item['label']))}</p>")
        if item.get("caption") is not None:
            out.append(f"<p><b>Composed caption:</b> {e(str(item['caption']))}</p>")
        ctrl = item.get("control") or {}
        if ctrl.get("caption") is not None:
            out.append(f"<p class='muted'><b>Control caption</b> (image of {e(str(ctrl['partner']))}): {e(str(ctrl['caption']))}</p>")
        elif ctrl.get("missing"):
            out.append(f"<p class='muted'><b>Control:</b> {e(str(ctrl['missing']))}</p>")
        refs = item.get("references") or []
        if refs:
            out.append("<p><b>References:</b></p><ol>" + "".join(f"<li>{e(str(r))}</li>" for r in refs) + "</ol>")
        qas = item.get("qa") or []
        if qas:
            cqas = ctrl.get("qa") or []
            out.append("<table><tr><th>question</th><th>type</th><th>expert (router confidence)</th><th>prediction</th><th>answer</th><th>correct</th>"
                       + ("<th>control prediction</th><th>control correct</th>" if cqas else "") + "</tr>")
            for j, qa in enumerate(qas):
                ok = _qa_correct(qa)
                cells = "".join(f"<td>{e(str(c))}</td>" for c in (qa.get("question", ""), qa.get("type", ""), _expert_cell(qa),
                                                                     qa.get("prediction", ""), qa.get("answer", "")))
                cells += f"<td class='{'ok' if ok else 'bad'}'>{'yes' if ok else 'no'}</td>"
                if cqas:
                    cok = _qa_correct({**qa, **cqas[j]})
                    cells += f"<td>{e(str(cqas[j].get('prediction', '')))}</td><td class='{'ok' if cok else 'bad'}'>{'yes' if cok else 'no'}</td>"
                out.append(f"<tr>{cells}</tr>")
            out.append("</table>")
        out.append("</div></div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(out_dir: str | Path, results: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Path]:
    """Write ``results.json``, ``report.html`` (self-contained, base64 thumbnails) and ``report.md``.

    ``items``: ``{"key", "image_png": bytes | None, "experts": {name: text}, "caption": str,
    "references": [str], "qa": [{"question", "type", "prediction", "answer", "expert"}]}``; all
    keys but ``key`` are optional. A QA row may carry ``"correct"``; otherwise it is recomputed
    with :func:`normalize_answer`. Optional ``"label"`` (the image's class) and ``"control"``
    (``{"partner", "caption", "qa": [{"prediction", "correct"}], "missing"}``: the grounding
    control's output) are shown too. The Markdown report links thumbnails written to ``thumbs/``.

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
