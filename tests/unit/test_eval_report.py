"""Report writer: results.json, report.html (embedded thumbnails) and report.md with every expert's text."""

from __future__ import annotations

import io
import json

import pytest

from rsmoe.eval import (
    caption_intervals,
    caption_section,
    score_captions,
    vqa_accuracy,
    vqa_section,
    write_report,
)


def _png() -> bytes | None:
    try:
        from PIL import Image
    except ImportError:
        return None
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (30, 120, 60)).save(buf, format="PNG")
    return buf.getvalue()


def test_write_report(tmp_path):
    experts = {"theme": "A dense urban <area>.", "objects": "Buildings | roads.", "relations": "Roads run between buildings."}
    caption = " ".join(experts.values())
    refs = ["An urban area with buildings and roads.", "Dense buildings along roads."]
    scores = score_captions({"img1": caption, "img2": "trees"}, {"img1": refs, "img2": ["many trees"]}, java=False)
    acc = vqa_accuracy(["Yes.", "3"], ["yes", "4"], ["presence", "count"])
    results = {
        "meta": {"model": "rsmoe-tiny", "setting": "zero-shot"},
        "captioning": caption_section(scores, caption_intervals(scores, n_resamples=50, n_resamples_cider=5)),
        "vqa": vqa_section(acc),
    }
    items = [
        {
            "key": "img1",
            "image_png": _png(),
            "experts": experts,
            "caption": caption,
            "references": refs,
            "qa": [
                {"question": "Is there a road?", "type": "presence", "prediction": "Yes.", "answer": "yes", "expert": "objects"},
                {"question": "How many buildings?", "type": "count", "prediction": "3", "answer": "4", "expert": "objects"},
            ],
        },
        {"key": "img2", "image_png": None, "experts": {}, "caption": "trees", "references": ["many trees"], "qa": []},
    ]
    paths = write_report(tmp_path / "out", results, items)
    assert set(paths) == {"json", "html", "md"} and all(p.is_file() for p in paths.values())

    data = json.loads(paths["json"].read_text())
    assert data["captioning"]["metrics"]["BLEU-1"] == pytest.approx(scores.corpus["BLEU-1"])
    assert "SPICE" in data["captioning"]["unavailable"]
    assert data["items"][0]["experts"] == experts and "image_png" not in data["items"][0]

    html_text = paths["html"].read_text()
    md_text = paths["md"].read_text()
    assert "A dense urban &lt;area&gt;." in html_text  # escaped, not injected
    assert "Buildings \\| roads." in md_text  # table cell pipe escaped
    for text in [experts["relations"], refs[0], "Is there a road?", "BLEU-4", "CIDEr", "zero-shot"]:
        assert text in html_text and text in md_text
    if items[0]["image_png"] is not None:
        assert "data:image/png;base64," in html_text
        assert (tmp_path / "out" / "thumbs").is_dir()
    assert html_text.count("class='ok'") == 1 and html_text.count("class='bad'") == 1
