"""Image-grounding control: the derangement, the paired bootstrap (against direct computations) and
the verdicts on a model that uses its image and one that ignores it."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from rsmoe.eval.bootstrap import (
    caption_intervals,
    paired_caption_intervals,
    paired_cluster_intervals,
)
from rsmoe.eval.caption_metrics import score_captions
from rsmoe.eval.grounding import (
    BLIND,
    USES,
    WORSE,
    derangement,
    distinct_share,
    verdict,
)


def test_derangement_keeps_datasets_and_moves_every_image():
    entries = [(f"a{i}", "A") for i in range(7)] + [(f"b{i}", "B") for i in range(2)] + [("c0", "C")]
    pairs = derangement(entries, seed=3)
    assert set(pairs) == {k for k, d in entries if d != "C"}  # a dataset of one sample has no partner
    assert all(pairs[k] != k for k in pairs)
    assert all(pairs[k][0] == k[0] for k in pairs)  # the partner is from the same dataset
    for ds in "AB":
        keys = [k for k, d in entries if d == ds]
        assert sorted(pairs[k] for k in keys) == sorted(keys)  # a permutation: every image used once
    assert pairs == derangement(entries, seed=3)
    assert any(derangement(entries, seed=s) != pairs for s in range(4, 8))
    # Another dataset in the shards does not change a dataset's pairing.
    assert {k: v for k, v in derangement(entries + [(f"z{i}", "Z") for i in range(5)], seed=3).items() if k[0] != "z"} == pairs


def test_verdicts_and_distinct_share():
    assert verdict((-0.1, 0.2)) == BLIND and verdict((0.0, 0.0)) == BLIND
    assert verdict((0.01, 0.2)) == USES and verdict((-0.3, -0.01)) == WORSE
    d = distinct_share(["A farm. Trees.", "A farm. Roads.", "a  farm. trees.", "A river."])
    assert (d["distinct_captions"], d["distinct_opening_sentences"], d["n"]) == (3, 2, 4)
    assert d["distinct_caption_share"] == 0.75


REFS = {
    "i0": ["many planes are parked at the airport", "several airplanes near a terminal"],
    "i1": ["a river runs through a dense forest", "green trees on both banks of a river"],
    "i2": ["houses are arranged in rows", "a dense residential area with roads"],
    "i3": ["a baseball diamond with sand", "an old baseball field"],
    "i4": ["boats docked in a harbor", "many boats are moored at the harbor"],
    "i5": ["a white storage tank on the ground", "two storage tanks beside a road"],
}
REAL = {"i0": "many airplanes are parked at the airport", "i1": "a river runs through the forest",
        "i2": "houses in a dense residential area", "i3": "a baseball diamond", "i4": "boats moored in a harbor",
        "i5": "a white storage tank beside a road"}
CONTROL = {k: REAL[f"i{(int(k[1]) + 1) % 6}"] for k in REAL}  # each image's caption moved to the next id


def test_paired_caption_intervals_match_a_direct_computation():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from rsmoe.eval.bootstrap import bootstrap_cider_ci

    real = score_captions(REAL, REFS, java=False)
    ctrl = score_captions(CONTROL, REFS, java=False)
    R = 40
    ivs = paired_caption_intervals(real, ctrl, n_resamples=R, n_resamples_cider=R, seed=5)
    # Direct: draw the same resamples, give duplicated images fresh ids, score each arm with pycocoevalcap.
    idx = np.random.default_rng(5).integers(0, len(real.ids), (R, len(real.ids)))
    deltas, controls, cider_d = [], [], []
    for row in idx:
        ids = [real.ids[i] for i in row]
        gts = {f"{n}": real.tokenized_references[k] for n, k in enumerate(ids)}
        res_r = {f"{n}": [real.tokenized_candidates[k]] for n, k in enumerate(ids)}
        res_c = {f"{n}": [ctrl.tokenized_candidates[k]] for n, k in enumerate(ids)}
        b_r, _ = Bleu(4).compute_score(gts, res_r, verbose=0)
        b_c, _ = Bleu(4).compute_score(gts, res_c, verbose=0)
        deltas.append(b_r[3] - b_c[3])
        controls.append(b_c[3])
        cider_d.append(Cider().compute_score(gts, res_r)[0] - Cider().compute_score(gts, res_c)[0])
    assert ivs["BLEU-4"]["delta_ci"] == pytest.approx(tuple(np.quantile(deltas, [0.025, 0.975])), abs=1e-9)
    assert ivs["BLEU-4"]["control_ci"] == pytest.approx(tuple(np.quantile(controls, [0.025, 0.975])), abs=1e-9)
    rouge_d = [np.mean([real.per_image["ROUGE-L"][real.ids[i]] - ctrl.per_image["ROUGE-L"][real.ids[i]] for i in row]) for row in idx]
    assert ivs["ROUGE-L"]["delta_ci"] == pytest.approx(tuple(np.quantile(rouge_d, [0.025, 0.975])))
    assert ivs["CIDEr"]["delta_ci"] == pytest.approx(tuple(np.quantile(cider_d, [0.025, 0.975])), abs=1e-9)
    assert ivs["CIDEr"]["delta_ci"][0] > 0  # the swapped captions are much worse
    # One arm compared with itself: the delta is exactly 0 and its interval is the unpaired one.
    same = paired_caption_intervals(real, real, n_resamples=R, n_resamples_cider=5, seed=5)
    assert all(v["delta_ci"] == (0.0, 0.0) for v in same.values())
    alone = caption_intervals(real, n_resamples=R, n_resamples_cider=5, seed=5)
    for m in ("BLEU-1", "BLEU-4", "CIDEr"):
        assert same[m]["control_ci"] == pytest.approx((alone[m]["low"], alone[m]["high"]))
    # The real arm's CIDEr resamples are computed once and shared; the interval is the public function's.
    assert (alone["CIDEr"]["low"], alone["CIDEr"]["high"]) == bootstrap_cider_ci(
        real.tokenized_candidates, real.tokenized_references, real.ids, n_resamples=5, seed=5)


def test_paired_cluster_intervals_match_a_direct_computation():
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(8), [3, 1, 4, 2, 2, 5, 1, 2])
    types = rng.choice(["presence", "comparison"], clusters.size)
    real = rng.random(clusters.size) < 0.8
    ctrl = rng.random(clusters.size) < 0.5
    specs = {"overall": [np.ones(clusters.size, bool)], "presence": [types == "presence"],
             "mean_of_types": [types == "presence", types == "comparison"]}
    R = 300
    out = paired_cluster_intervals(clusters, real, ctrl, specs, n_resamples=R, seed=2)
    assert out["overall"]["real"] == pytest.approx(real.mean()) and out["overall"]["control"] == pytest.approx(ctrl.mean())
    assert out["mean_of_types"]["real"] == pytest.approx(np.mean([real[types == t].mean() for t in ("presence", "comparison")]))
    idx = np.random.default_rng(2).integers(0, 8, (R, 8))
    d_all, d_pres = [], []
    for row in idx:  # images drawn with replacement, each with all its questions, both arms
        q = np.concatenate([np.flatnonzero(clusters == i) for i in row])
        d_all.append(real[q].mean() - ctrl[q].mean())
        p = q[types[q] == "presence"]
        if p.size:
            d_pres.append(real[p].mean() - ctrl[p].mean())
    assert out["overall"]["delta_ci"] == pytest.approx(tuple(np.quantile(d_all, [0.025, 0.975])))
    assert out["presence"]["delta_ci"] == pytest.approx(tuple(np.quantile(d_pres, [0.025, 0.975])))
    assert out["presence"]["n_resamples"] == len(d_pres)


# ------------------------------------------------------------------ end to end with a stand-in model

COLOURS = {"airplane": (250, 20, 20), "beach": (240, 220, 150), "forest": (10, 120, 20), "river": (20, 40, 200),
           "runway": (90, 90, 90), "harbor": (0, 200, 200), "golfcourse": (120, 250, 120), "buildings": (200, 200, 200)}
WORDS = {"airplane": "airplanes", "beach": "a beach", "forest": "a forest", "river": "a river", "runway": "a runway",
         "harbor": "boats in a harbor", "golfcourse": "a golf course", "buildings": "buildings"}


def _png(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _class_of(pixels, cfg) -> str:
    """The stand-in model 'sees' the image: the class whose colour is nearest the image's mean colour."""
    v = cfg.model.vision
    rgb = (pixels.float().mean(dim=(1, 2)).numpy() * np.asarray(v.image_std) + np.asarray(v.image_mean)) * 255
    return min(COLOURS, key=lambda c: float(np.sum((np.asarray(COLOURS[c]) - rgb) ** 2)))


@pytest.fixture(scope="module")
def class_shards(tmp_path_factory):
    from rsmoe.data.schema import Sample, make_record
    from rsmoe.data.shards import write_shards

    out = tmp_path_factory.mktemp("class-shards")
    samples = []
    for n, cls in enumerate(COLOURS):
        cap = f"There is {WORDS[cls]}."
        qa = [{"question": f"Is there {WORDS[cls]}?", "type": "presence", "answer": "yes"},
              {"question": "Is a beach present?", "type": "presence", "answer": "yes" if cls == "beach" else "no"}]
        rec = make_record(caption=cap, parts={"theme": cap}, dataset="UCM-Captions", split="test", image_id=str(n),
                          qa=qa, references=[cap, f"This is {WORDS[cls]}."], label=cls)
        samples.append(Sample(f"UCM-Captions_{n}", _png(COLOURS[cls]), "png", rec))
    write_shards(samples, out)
    return str(out / "test-*.tar")


def _patch(monkeypatch, cfg_holder, *, blind: bool):
    from rsmoe.inference import generate as inference

    calls = {"caption_rows": 0}

    def fake_caption(model, processor, pixel_values, instructions=None, gen=None, sequential=False):
        calls["caption_rows"] += pixel_values.shape[0]
        out = []
        for px in pixel_values:
            cls = "airplane" if blind else _class_of(px, cfg_holder["cfg"])
            text = f"There is {WORDS[cls]}."
            out.append({"experts": {"theme": text, "objects": "", "relations": ""}, "caption": text, "truncated": []})
        return out

    def fake_answer(model, processor, pixel_values, questions, types=None, gen=None, image_index=None):
        seen = [_class_of(pixel_values[i], cfg_holder["cfg"]) for i in image_index]
        return [{"answer": "yes" if (blind or WORDS[c] in q) else "no", "expert": "objects"} for q, c in zip(questions, seen)]

    monkeypatch.setattr(inference, "caption", fake_caption)
    monkeypatch.setattr(inference, "answer", fake_answer)
    return calls


@pytest.fixture(scope="module")
def stage2(tiny_runs):
    return tiny_runs["stage2"]


def _evaluate(stage2, shards, out, **kw):
    from rsmoe.eval.run import EvalOptions, evaluate

    opts = dict(model=str(stage2), shards=shards, out=str(out), bootstrap=200, progress=False, meteor=False,
                java=False, setting="zero-shot")
    opts.update(kw)
    return evaluate(EvalOptions(**opts))


def test_a_model_that_looks_is_told_apart_from_one_that_does_not(stage2, class_shards, tmp_path, monkeypatch):
    from rsmoe.inference.load import load_trained

    cfg_holder = {"cfg": load_trained(str(stage2), "cpu").cfg}
    calls = _patch(monkeypatch, cfg_holder, blind=False)
    res = _evaluate(stage2, class_shards, tmp_path / "looks")
    cap = res["caption/UCM-Captions"]
    assert calls["caption_rows"] == 8  # one caption per image: every control caption is the partner's real one
    assert cap["metrics"]["class_mention_accuracy"] == 1.0
    g = cap["grounding"]
    assert g["metrics"]["class_mention_accuracy"]["control"] == 0.0  # one image per class: the partner's class is another
    assert g["metrics"]["class_mention_accuracy"]["verdict"] == USES and g["metrics"]["CIDEr"]["delta_low"] > 0
    assert g["distinct"]["real"]["distinct_captions"] == 8 and g["reused_captions"] == 8
    assert "the model uses the image on this set" in g["summary"]
    vqa = res["vqa/UCM-Captions"]["grounding"]
    assert vqa["metrics"]["overall"]["real"] == 1.0 and vqa["metrics"]["overall"]["verdict"] == USES
    saved = json.loads((tmp_path / "looks" / "results.json").read_text())
    by_key = {it["key"]: it for it in saved["items"]}
    for it in saved["items"]:  # the control arm saw exactly the partner's image
        partner = by_key[it["control"]["partner"]]
        assert it["control"]["caption"] == partner["caption"] and partner["key"] != it["key"]
        assert it["control"]["qa"][0]["prediction"] == "no"  # "is there <my class>?" about another class's image
    html = (tmp_path / "looks" / "report.html").read_text()
    assert "image-grounding control" in html and "uses the image" in html and "control prediction" in html

    # Generating every control caption instead of copying it gives the same control arm.
    again = _evaluate(stage2, class_shards, tmp_path / "again", reuse_control_captions=False)
    assert calls["caption_rows"] == 8 + 16
    assert again["caption/UCM-Captions"]["grounding"]["metrics"] == g["metrics"]

    _patch(monkeypatch, cfg_holder, blind=True)
    blind = _evaluate(stage2, class_shards, tmp_path / "blind")
    gb = blind["caption/UCM-Captions"]["grounding"]
    assert blind["caption/UCM-Captions"]["metrics"]["class_mention_accuracy"] == pytest.approx(1 / 8)  # chance
    assert all(r["verdict"] == BLIND and r["delta"] == 0 for r in gb["metrics"].values())
    assert gb["distinct"]["real"]["distinct_captions"] == 1
    assert "cannot be told apart from a model that ignores the image" in gb["summary"]
    assert blind["vqa/UCM-Captions"]["grounding"]["metrics"]["overall"]["verdict"] == BLIND
    off = _evaluate(stage2, class_shards, tmp_path / "off", grounding_control=False, bootstrap=0)
    assert "grounding" not in off["caption/UCM-Captions"] and off["meta"]["grounding_control"] == {"enabled": False}


def test_control_captions_copied_from_the_real_arm_equal_generated_ones(stage2, sample_shards, tmp_path):
    # The real tiny model: copying the partner's caption is exact because a row's greedy generation
    # does not depend on the other rows of its batch.
    kw = dict(task="caption", limit=12, max_new_tokens=8, bootstrap=0, thumbnails=False, batch_size=5)
    copied = _evaluate(stage2, sample_shards["val"], tmp_path / "copied", **kw)
    generated = _evaluate(stage2, sample_shards["val"], tmp_path / "generated", reuse_control_captions=False, **kw)
    a = json.loads((tmp_path / "copied" / "results.json").read_text())["items"]
    b = json.loads((tmp_path / "generated" / "results.json").read_text())["items"]
    assert [it["control"]["caption_reused"] for it in a] == [True] * 12
    assert [it["control"]["caption_reused"] for it in b] == [False] * 12
    for x, y in zip(a, b):
        assert (x["control"]["experts"], x["control"]["caption"]) == (y["control"]["experts"], y["control"]["caption"])
    assert copied["meta"]["grounding_control"]["captions_reused"] == 12
    assert generated["meta"]["grounding_control"]["captions_generated"] == 12


def test_a_corrupt_partner_image_leaves_that_sample_out_with_the_reason(stage2, tmp_path, monkeypatch):
    from rsmoe.data.schema import Sample, make_record
    from rsmoe.data.shards import write_shards
    from rsmoe.inference.load import load_trained

    samples = []
    for n, cls in enumerate(COLOURS):
        cap = f"There is {WORDS[cls]}."
        rec = make_record(caption=cap, parts={"theme": cap}, dataset="UCM-Captions", split="test", image_id=str(n),
                          qa=[{"question": f"Is there {WORDS[cls]}?", "type": "presence", "answer": "yes"}], label=cls)
        samples.append(Sample(f"UCM-Captions_{n}", b"not an image" if n == 3 else _png(COLOURS[cls]), "png", rec))
    write_shards(samples, tmp_path / "shards")
    _patch(monkeypatch, {"cfg": load_trained(str(stage2), "cpu").cfg}, blind=False)
    res = _evaluate(stage2, str(tmp_path / "shards" / "test-*.tar"), tmp_path / "out")
    assert res["meta"]["skipped_corrupt_images"] == ["UCM-Captions_3"]
    items = json.loads((tmp_path / "out" / "results.json").read_text())["items"]
    orphan = next(it for it in items if it["control"]["partner"] == "UCM-Captions_3")
    assert "could not be read" in orphan["control"]["missing"]  # its questions needed the corrupt image
    for task in ("caption", "vqa"):
        g = res[f"{task}/UCM-Captions"]["grounding"]
        assert list(g["missing"]) == [orphan["key"]] and g["n_images"] == 6  # 8 - the corrupt one - its orphan
    assert res["meta"]["grounding_control"]["missing"] == {orphan["key"]: orphan["control"]["missing"]}
