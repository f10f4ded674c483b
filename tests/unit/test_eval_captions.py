"""Caption metrics against pycocoevalcap's scorers called directly, plus the no-Java/SPICE paths."""

from __future__ import annotations

import shutil

import pytest

from rsmoe.eval import (
    caption_intervals,
    java_status,
    score_captions,
    simple_ptb_tokenize,
)
from rsmoe.eval.bootstrap import bootstrap_bleu_ci, cider_on_subset
from rsmoe.eval.caption_metrics import bleu_from_statistics

CANDS = {
    "img1": "A large white building is next to a wide road.",
    "img2": "Many green trees surround a small pond in the park.",
    "img3": "Several cars are parked in the parking lot (near the school).",
    "img4": "A river crosses the farmland.",
}
REFS = {
    "img1": ["A white building stands beside a road.", "There is a large building next to the road."],
    "img2": ["Green trees surround a pond in a park.", "A small pond with many trees around it."],
    "img3": ["Many cars are parked in a parking lot.", "A parking lot near a school, full of cars."],
    "img4": ["A river runs through farmland.", "Farmland on both sides of a winding river."],
}

needs_java = pytest.mark.skipif(not java_status()[0], reason="Java runtime not available")


@pytest.fixture(scope="module")
def meteor():
    """One METEOR JVM for the whole module: starting it costs ~10 s."""
    if not java_status()[0]:
        pytest.skip("Java runtime not available")
    from pycocoevalcap.meteor.meteor import Meteor

    m = Meteor()
    yield m
    m.meteor_p.stdin.close()
    m.meteor_p.kill()
    m.meteor_p.wait()


@needs_java
def test_scores_match_pycocoevalcap_scorers_called_directly(meteor):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer()
    gts = ptb.tokenize({k: [{"caption": r} for r in v] for k, v in REFS.items()})
    res = ptb.tokenize({k: [{"caption": v}] for k, v in CANDS.items()})
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    met, met_per = meteor.compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, cider_per = Cider().compute_score(gts, res)

    s = score_captions(CANDS, REFS, meteor=meteor)
    assert s.tokenizer.startswith("ptb")
    for n in range(4):
        assert s.corpus[f"BLEU-{n + 1}"] == pytest.approx(bleu[n], abs=1e-9)
        assert [s.per_image[f"BLEU-{n + 1}"][k] for k in CANDS] == pytest.approx(bleu_per[n], abs=1e-9)
    assert s.corpus["METEOR"] == pytest.approx(met, abs=1e-9)
    assert [s.per_image["METEOR"][k] for k in CANDS] == pytest.approx(met_per, abs=1e-9)
    assert s.corpus["ROUGE-L"] == pytest.approx(rouge, abs=1e-9)
    assert s.corpus["CIDEr"] == pytest.approx(cider, abs=1e-9)
    assert [s.per_image["CIDEr"][k] for k in CANDS] == pytest.approx(list(cider_per), abs=1e-9)
    assert 0 < s.corpus["METEOR"] < 1
    # The per-image statistics used by the bootstrap reproduce corpus BLEU and CIDEr exactly.
    assert list(bleu_from_statistics(s.bleu_stats.sum(0))) == pytest.approx(bleu, abs=1e-12)
    from pycocoevalcap.cider.cider_scorer import cook_refs, cook_test

    tests = [cook_test(s.tokenized_candidates[k]) for k in s.ids]
    refs = [cook_refs(s.tokenized_references[k]) for k in s.ids]
    assert cider_on_subset(tests, refs, list(range(len(s.ids)))) == pytest.approx(cider, abs=1e-12)


@needs_java
def test_identical_candidate_and_reference_score_one(meteor):
    refs = {k: [v] for k, v in CANDS.items()}
    s = score_captions(CANDS, refs, meteor=meteor)
    assert s.corpus["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert s.corpus["ROUGE-L"] == pytest.approx(1.0, abs=1e-9)
    assert s.corpus["METEOR"] > 0.99


def test_no_java_still_scores_bleu_rouge_cider(monkeypatch):
    monkeypatch.setenv("RSMOE_EVAL_NO_JAVA", "1")
    s = score_captions(CANDS, REFS)
    assert set(s.corpus) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert "METEOR" in s.unavailable and "default-jre-headless" in s.unavailable["METEOR"]
    assert s.tokenizer.startswith("python-ptb-approx")
    assert 0 < s.corpus["BLEU-1"] <= 1 and s.corpus["CIDEr"] > 0
    # java=False is the same switch as the environment variable.
    monkeypatch.delenv("RSMOE_EVAL_NO_JAVA")
    s2 = score_captions(CANDS, REFS, java=False, use_meteor=True)
    assert s2.corpus == s.corpus


def test_missing_java_binary_is_reported(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    ok, reason = java_status()
    assert not ok and "not found on PATH" in reason and "apt-get install default-jre-headless" in reason
    s = score_captions(CANDS, REFS)
    assert "METEOR" in s.unavailable and "BLEU-4" in s.corpus


def test_spice_reported_unavailable_without_download():
    from rsmoe.eval import spice_status

    if spice_status()[0]:
        pytest.skip("CoreNLP jars are installed here; the offline path cannot be exercised")
    s = score_captions(CANDS, REFS, java=False, use_spice=True)
    assert "SPICE" not in s.corpus
    assert "CoreNLP 3.6.0 models not available offline" in s.unavailable["SPICE"]


@needs_java
def test_python_tokenizer_matches_ptb_on_typical_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sents = [
        "Many (white) buildings don't stand near the river's 1,000 trees.",
        "A well-known stadium, 3.5 km away; cars: parked!",
        'The U.S. "airport" has two runways... and a tower?',
        "Farmland -- green and brown -- covers the area.",
    ]
    out = PTBTokenizer().tokenize({str(i): [{"caption": s}] for i, s in enumerate(sents)})
    assert [simple_ptb_tokenize(s) for s in sents] == [out[str(i)][0] for i in range(len(sents))]


def test_mismatched_ids_raise_clear_error():
    refs = dict(REFS)
    refs.pop("img4")
    refs["extra"] = ["x"]
    with pytest.raises(ValueError, match=r"ids differ.*img4.*extra"):
        score_captions(CANDS, refs, java=False)
    with pytest.raises(ValueError, match="non-empty list"):
        score_captions({"a": "x"}, {"a": []}, java=False)
    with pytest.raises(ValueError, match="no candidate"):
        score_captions({}, {}, java=False)


def _synthetic_corpus(n: int = 40, seed: int = 0) -> tuple[dict[str, str], dict[str, list[str]]]:
    import random

    rng = random.Random(seed)
    words = "building road tree river park car parking lot green white large small many near field house".split()
    cands = {f"i{i}": " ".join(rng.choices(words, k=10)) for i in range(n)}
    refs = {f"i{i}": [" ".join(rng.choices(words, k=11)) for _ in range(3)] for i in range(n)}
    return cands, refs


def test_caption_intervals_contain_point_and_are_seeded():
    # CIDEr's resampled IDF is biased on very small corpora, so use a few dozen images here.
    s = score_captions(*_synthetic_corpus(), java=False)
    a = caption_intervals(s, n_resamples=300, n_resamples_cider=30, seed=7)
    b = caption_intervals(s, n_resamples=300, n_resamples_cider=30, seed=7)
    assert a == b
    for name in ("BLEU-1", "BLEU-2", "ROUGE-L", "CIDEr"):
        assert a[name]["low"] <= s.corpus[name] <= a[name]["high"], name
    assert bootstrap_bleu_ci(s.bleu_stats, n_resamples=300, seed=8) != bootstrap_bleu_ci(s.bleu_stats, n_resamples=300, seed=9)


@needs_java
def test_meteor_interval_brackets_the_reported_corpus_score(meteor):
    # The jar's pooled corpus METEOR differs from the per-image mean; the interval must still contain it.
    s = score_captions(*_synthetic_corpus(), meteor=meteor)
    ci = caption_intervals(s, n_resamples=300, n_resamples_cider=10, seed=3)["METEOR"]
    assert ci["low"] <= s.corpus["METEOR"] <= ci["high"]
    assert "centred on the jar's pooled corpus score" in ci["method"]
