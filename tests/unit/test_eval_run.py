"""`rsmoe eval` end to end on a tiny trained run: metrics, report, VQA scoring, 2 ranks == 1 process."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def run_dirs(tiny_runs) -> dict[str, Path]:
    return tiny_runs


def _opts(**kw):
    from rsmoe.eval.run import EvalOptions

    base = dict(max_new_tokens=10, vqa_max_new_tokens=4, bootstrap=50, progress=False, meteor=False)
    base.update(kw)
    return EvalOptions(**base)


def test_eval_writes_every_metric_and_every_expert_text(run_dirs, sample_shards, tmp_path):
    from rsmoe.eval.run import evaluate

    out = tmp_path / "report"
    res = evaluate(_opts(model=str(run_dirs["stage2"]), shards=sample_shards["val"], out=str(out),
                         questions_per_image=4, meteor=True))
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"meta", "caption/UCM-Captions", "caption/RSVQA-LR", "caption/RSVQA-HR", "caption/all",
                          "vqa/RSVQA-LR", "vqa/RSVQA-HR", "vqa/all", "items"}
    ucm = saved["caption/UCM-Captions"]
    assert {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(ucm["metrics"])
    assert "METEOR" in ucm["metrics"] or "needs Java" in ucm["unavailable"]["METEOR"]
    assert "SPICE" in ucm["unavailable"] or "SPICE" in ucm["metrics"]
    assert set(ucm["intervals"]) == set(ucm["metrics"])
    assert ucm["n_images"] == 21 and ucm["setting"] == "fine-tuned"  # the run trained on UCM-Captions
    assert 0.0 <= ucm["metrics"]["class_mention_accuracy"] <= 1.0  # UCM records carry their class
    assert "class_mention_accuracy" not in saved["caption/RSVQA-LR"]["metrics"]  # RSVQA has no class labels
    lr = saved["vqa/RSVQA-LR"]
    averages = {"rsvqa_average", "rsvqa_average_mean_of_types", "rsvqa_average_question_weighted"}
    assert {"overall", "presence", "comparison", "rural_urban", "count"} | averages <= set(lr["metrics"])
    assert averages <= set(lr["intervals"]) and lr["protocol"]["protocol"].startswith("RSVQA-LR")
    assert lr["metrics"]["rsvqa_average"] == lr["metrics"]["rsvqa_average_mean_of_types"]
    assert not averages & set(saved["vqa/all"]["metrics"])
    # The grounding control: every section, both arms, paired intervals, the verdict in words.
    for name in ("caption/UCM-Captions", "caption/all", "vqa/RSVQA-LR", "vqa/all"):
        g = saved[name]["grounding"]
        assert g["available"] and g["missing"] == {} and g["summary"].startswith(name)
        for row in g["metrics"].values():
            assert row["delta_low"] <= row["delta_high"] and row["delta"] == pytest.approx(row["real"] - row["control"])
            assert row["verdict"] in ("cannot be told apart from a model that ignores the image",
                                      "the model uses the image on this set", "the control scores higher: its own image makes the model worse")
    assert set(saved["caption/UCM-Captions"]["grounding"]["metrics"]) == set(ucm["metrics"])  # METEOR too, with Java
    assert averages - {"rsvqa_average"} <= set(lr["grounding"]["metrics"])
    assert saved["meta"]["grounding_control"]["captions_reused"] == 34  # one default instruction per dataset
    assert saved["meta"]["grounding_control"]["questions_asked"] == 13 * 4
    assert saved["meta"]["n_images"] == 34 and saved["meta"]["n_questions"] == 13 * 4

    items = saved["items"]
    assert [it["key"] for it in items][:3] == ["RSVQA-LR_10", "RSVQA-LR_24", "RSVQA-LR_26"]  # shard order
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for it in items:
        assert set(it["experts"]) == {"theme", "objects", "relations"}
        assert it["references"]
        assert f"### {it['key']}" in md
        for name, text in it["experts"].items():
            assert f"| {name} | {text.replace('|', chr(92) + '|')}" in md
    assert html.count("<div class='item'>") == 34 and html.count("data:image/png;base64,") == 34
    assert html.count("image-grounding control</h3>") == 7  # 4 caption + 3 VQA sections and "Control caption" in html and "control prediction" in html
    assert md.count("image-grounding control") == 7
    assert res["_paths"]["html"] == str(out / "report.html")


def test_limit_takes_the_first_samples_in_shard_order(run_dirs, sample_shards, tmp_path):
    from rsmoe.data.loader import expand_shards
    from rsmoe.eval.run import evaluate, scan_keys

    res = evaluate(_opts(model=str(run_dirs["stage1"]), shards=sample_shards["val"], out=str(tmp_path), limit=5,
                         task="caption", bootstrap=0, thumbnails=False))
    first = [k for _, k, _ in scan_keys(sorted(expand_shards(sample_shards["val"])))][:5]
    items = json.loads((tmp_path / "results.json").read_text())["items"]
    assert [it["key"] for it in items] == first
    assert all(set(it["experts"]) == {"llm"} for it in items)  # a Stage I model has one expert
    assert res["meta"]["stage"] == 1 and res["caption/RSVQA-LR"]["intervals"] == {}


def _png(seed: int) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# question -> (type, ground truth, what the patched generator answers, correct after normalisation?)
SYNTHETIC = {
    "RSVQA-LR": [
        ("Is a road present?", "presence", "yes", "Yes.", True),
        ("Is a farm present?", "presence", "no", "yes", False),
        ("Are there more roads than houses?", "comp", "yes", "yes, there are", True),
        ("Are there less water areas than roads?", "comp", "no", "No", True),
        ("Is it a rural or an urban area", "rural_urban", "rural", "urban", False),
        ("How many roads are there?", "count", "2", "two", True),
        ("How many houses are there?", "count", "between 11 and 100", "12", False),
    ],
    "RSVQA-HR": [
        ("Is there a building?", "presence", "yes", "yes", True),
        ("Is the number of roads equal to the number of houses?", "comp", "no", "yes", False),
        ("What is the area covered by buildings?", "area", "10m2", "10 m2", True),
    ],
}


def test_vqa_scores_match_a_hand_computation(run_dirs, tmp_path, monkeypatch):
    from rsmoe.data.schema import Sample
    from rsmoe.data.shards import write_shards
    from rsmoe.eval.run import evaluate
    from rsmoe.inference import generate as inference

    samples = []
    for ds, rows in SYNTHETIC.items():
        for j in range(2):  # the questions are split over two images per dataset
            qa = [{"question": q, "type": t, "answer": a} for q, t, a, _, _ in rows[j::2]]
            rec = {"caption": "A test image.", "parts": {"theme": "A test image.", "objects": "", "relations": ""},
                   "qa": qa, "dataset": ds, "split": "test", "image_id": f"{ds}{j}"}
            samples.append(Sample(f"{ds}_{j}", _png(len(samples)), "png", rec))
    write_shards(samples, tmp_path / "shards")
    predictions = {q: p for rows in SYNTHETIC.values() for q, _, _, p, _ in rows}

    def fake_answer(model, processor, pixel_values, questions, types=None, gen=None, image_index=None):
        # Each image of the call once; every question points at one of them.
        assert len(image_index) == len(questions) and sorted(set(image_index)) == list(range(pixel_values.shape[0]))
        return [{"answer": predictions[q], "expert": "objects"} for q in questions]

    monkeypatch.setattr(inference, "answer", fake_answer)
    res = evaluate(_opts(model=str(run_dirs["stage2"]), shards=str(tmp_path / "shards" / "test-*.tar"), task="vqa",
                         out=str(tmp_path / "out"), setting="zero-shot", vqa_batch_size=3))
    lr, hr, both = res["vqa/RSVQA-LR"], res["vqa/RSVQA-HR"], res["vqa/all"]
    assert lr["metrics"]["presence"] == 0.5 and lr["metrics"]["comparison"] == 1.0
    assert lr["metrics"]["rural_urban"] == 0.0 and lr["metrics"]["count"] == 0.5
    assert lr["metrics"]["count_bucketed"] == 1.0  # 2 vs "two": same bucket; 12 is "between 11 and 100"
    assert lr["metrics"]["rsvqa_average"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # count left out
    assert lr["metrics"]["rsvqa_average_question_weighted"] == pytest.approx((1 + 2 + 0) / 5)  # 3 of 5 protocol questions
    assert lr["metrics"]["overall"] == pytest.approx(4 / 7)
    assert hr["metrics"]["rsvqa_average"] == pytest.approx((1.0 + 0.0) / 2)  # area left out
    # The stand-in answers by question only, i.e. it ignores the image: the control scores the same.
    assert all(r["delta"] == 0 and r["verdict"].startswith("cannot be told apart") for r in lr["grounding"]["metrics"].values())
    assert hr["metrics"]["area"] == 1.0 and hr["metrics"]["overall"] == pytest.approx(2 / 3)
    assert both["metrics"]["overall"] == pytest.approx(6 / 10) and "rsvqa_average" not in both["metrics"]
    assert lr["setting"] == "zero-shot" and hr["n_per_type"] == {"area": 1, "comparison": 1, "presence": 1}
    rows = [qa for it in json.loads((tmp_path / "out" / "results.json").read_text())["items"] for qa in it["qa"]]
    expected = {q: ok for rows_ in SYNTHETIC.values() for q, _, _, _, ok in rows_}
    assert len(rows) == 10 and all(r["correct"] == expected[r["question"]] for r in rows)

    plain = evaluate(_opts(model=str(run_dirs["stage2"]), shards=str(tmp_path / "shards" / "test-*.tar"), task="vqa",
                           out=str(tmp_path / "out2"), protocol="none", bootstrap=0))
    assert "rsvqa_average" not in plain["vqa/RSVQA-LR"]["metrics"]
    assert plain["vqa/RSVQA-LR"]["metrics"]["overall"] == lr["metrics"]["overall"]


def test_without_java_meteor_is_unavailable_and_the_rest_is_scored(run_dirs, sample_shards, tmp_path, capsys):
    from rsmoe.eval.run import evaluate

    res = evaluate(_opts(model=str(run_dirs["stage2"]), shards=sample_shards["val"], out=str(tmp_path), limit=6,
                         task="caption", meteor=True, java=False, bootstrap=0, thumbnails=False))
    sec = res["caption/RSVQA-LR"]
    assert "needs Java" in sec["unavailable"]["METEOR"]
    assert {"BLEU-4", "ROUGE-L", "CIDEr"} <= set(sec["metrics"])
    assert any("METEOR unavailable" in w for w in res["meta"]["warnings"])


def test_cli_errors_are_one_clear_line(run_dirs, sample_shards, tmp_path, capsys):
    from rsmoe.cli import main

    assert main(["eval", "--model", str(tmp_path / "nope"), "--shards", sample_shards["val"]]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--model", str(tmp_path / "empty"), "--shards", sample_shards["val"]]) == 2
    assert "is not an rsmoe model" in capsys.readouterr().err
    assert main(["eval", "--model", str(run_dirs["stage2"]), "--shards", str(tmp_path / "none-*.tar")]) == 2
    err = capsys.readouterr().err
    assert "matched no file" in err and len(err.strip().splitlines()) == 1
