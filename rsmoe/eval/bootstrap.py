"""Percentile bootstrap confidence intervals over test items (images or questions).

Each resample draws item indices with replacement (numpy ``default_rng(seed)``) and recomputes the
*corpus* metric on that multiset:

* BLEU-1..4: exact, from per-image sufficient statistics (n-gram matches, guesses, lengths), so a
  resample is one matrix product.
* CIDEr: exact, by re-running pycocoevalcap's CiderScorer on the resample, because its document
  frequencies (IDF) depend on which reference sets are in the corpus (duplicates count twice,
  as they would in a corpus containing them twice). Slower, hence fewer default resamples.
* ROUGE-L, VQA accuracy: the corpus score is a mean of per-item scores, so the mean is exact.
* METEOR / SPICE: the jar's corpus METEOR pools statistics inside Java; re-running the JVM per
  resample is too slow, so the interval takes the bootstrap spread of the *mean of per-image
  scores* and centres it on the corpus score (an approximation, stated in the result).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from rsmoe.eval.vqa_metrics import RSVQA_PROTOCOLS

from .caption_metrics import BLEU_NAMES, CaptionScores, bleu_from_statistics

logger = logging.getLogger(__name__)

DEFAULT_RESAMPLES = 1000
DEFAULT_CIDER_RESAMPLES = 200


def bootstrap_ci(
    stat: Callable[[np.ndarray], float],
    n_items: int,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over ``n_resamples`` resamples of ``n_items`` items.

    ``stat`` receives an int array of item indices (with repetitions) and returns the corpus metric.
    """
    if n_items < 1:
        raise ValueError("bootstrap needs at least one item")
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n_items, n_items)) for _ in range(n_resamples)])
    return _percentiles(values, confidence)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Interval for the mean of per-item values (accuracy, ROUGE-L, per-image METEOR)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("bootstrap needs at least one item")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, (n_resamples, v.size))
    return _percentiles(v[idx].mean(axis=1), confidence)


def bootstrap_bleu_ci(
    bleu_stats: np.ndarray,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Exact corpus BLEU-1..4 intervals from per-image statistics (see ``bleu_statistics``)."""
    n = len(bleu_stats)
    if n == 0:
        raise ValueError("bootstrap needs at least one item")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (n_resamples, n))
    # Counting how often each image is drawn turns every resample into a weighted sum of rows.
    weights = np.zeros((n_resamples, n))
    np.add.at(weights, (np.arange(n_resamples)[:, None], idx), 1.0)
    bleus = bleu_from_statistics(weights @ bleu_stats)
    return {name: _percentiles(bleus[:, k], confidence) for k, name in enumerate(BLEU_NAMES)}


def cider_on_subset(cooked_tests: list[Any], cooked_refs: list[Any], idx: np.ndarray) -> float:
    """Corpus CIDEr (pycocoevalcap CiderScorer) of the images ``idx`` (repetitions allowed)."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(n=4, sigma=6.0)
    scorer.ctest = [cooked_tests[i] for i in idx]
    scorer.crefs = [cooked_refs[i] for i in idx]
    scorer.document_frequency = defaultdict(float)
    score, _ = scorer.compute_score()
    return float(score)


def bootstrap_cider_ci(
    candidates: dict[str, str],
    references: dict[str, list[str]],
    ids: Sequence[str],
    *,
    n_resamples: int = DEFAULT_CIDER_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """CIDEr interval recomputing document frequencies on every resample (tokenised input)."""
    from pycocoevalcap.cider.cider_scorer import cook_refs, cook_test

    # n-gram counting is independent of the corpus: do it once, not per resample.
    tests = [cook_test(candidates[k]) for k in ids]
    refs = [cook_refs(references[k]) for k in ids]
    return bootstrap_ci(
        lambda idx: cider_on_subset(tests, refs, idx),
        len(ids),
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
    )


def cider_resamples(scores: CaptionScores, n_resamples: int, seed: int) -> np.ndarray:
    """Corpus CIDEr of ``n_resamples`` resamples of ``scores.ids`` (the draws of :func:`bootstrap_ci`
    with this seed), cached on ``scores`` so the paired control bootstrap does not recompute them."""
    key = ("CIDEr", n_resamples, seed)
    if key not in scores.bootstrap_cache:
        from pycocoevalcap.cider.cider_scorer import cook_refs, cook_test

        n = len(scores.ids)
        tests = [cook_test(scores.tokenized_candidates[k]) for k in scores.ids]
        refs = [cook_refs(scores.tokenized_references[k]) for k in scores.ids]
        idx = np.random.default_rng(seed).integers(0, n, (n_resamples, n))
        scores.bootstrap_cache[key] = np.array([cider_on_subset(tests, refs, row) for row in idx])
    return scores.bootstrap_cache[key]


def caption_intervals(
    scores: CaptionScores,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    n_resamples_cider: int = DEFAULT_CIDER_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Intervals for every metric in ``scores.corpus``.

    Returns ``{metric: {"low", "high", "method", "n_resamples"}}``; ``method`` says whether the
    interval is for the exact corpus metric or for the per-image mean (METEOR, SPICE).
    """
    out: dict[str, dict[str, Any]] = {}
    kw = {"seed": seed, "confidence": confidence}
    for name, (lo, hi) in bootstrap_bleu_ci(scores.bleu_stats, n_resamples=n_resamples, **kw).items():
        out[name] = {"low": lo, "high": hi, "method": "corpus BLEU from per-image statistics", "n_resamples": n_resamples}
    for name in scores.corpus:
        if name in out:
            continue
        values = [scores.per_image[name][k] for k in scores.ids]
        if name == "CIDEr":
            lo, hi = _percentiles(cider_resamples(scores, n_resamples_cider, seed), confidence)
            out[name] = {"low": lo, "high": hi, "method": "corpus CIDEr recomputed (IDF per resample)", "n_resamples": n_resamples_cider}
        elif name == "ROUGE-L":
            lo, hi = bootstrap_mean_ci(values, n_resamples=n_resamples, **kw)
            out[name] = {"low": lo, "high": hi, "method": "mean of per-image scores (exact)", "n_resamples": n_resamples}
        else:
            lo, hi = bootstrap_mean_ci(values, n_resamples=n_resamples, **kw)
            # The jar pools statistics, so its corpus score is not the per-image mean; use the mean's
            # bootstrap spread around the reported corpus score, so the interval brackets the number shown.
            mean = sum(values) / len(values) if values else 0.0
            point = float(scores.corpus[name])
            lo, hi = max(0.0, point - (mean - lo)), min(1.0, point + (hi - mean))
            out[name] = {
                "low": lo,
                "high": hi,
                "method": "spread of the per-image-score mean, centred on the jar's pooled corpus score (approximate)",
                "n_resamples": n_resamples,
            }
    return out


def vqa_intervals(
    accuracy: dict[str, Any],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Intervals for ``overall`` and each type of a :func:`vqa_accuracy` result.

    Per-type intervals resample questions within that type.
    """
    correct = np.asarray(accuracy["correct"], dtype=np.float64)
    types = np.asarray(accuracy["types"])
    kw = {"n_resamples": n_resamples, "seed": seed, "confidence": confidence}
    out: dict[str, dict[str, Any]] = {}
    lo, hi = bootstrap_mean_ci(correct, **kw)
    out["overall"] = {"low": lo, "high": hi, "method": "mean of per-question correctness", "n_resamples": n_resamples}
    for ty in accuracy["per_type"]:
        lo, hi = bootstrap_mean_ci(correct[types == ty], **kw)
        out[ty] = {"low": lo, "high": hi, "method": "mean of per-question correctness", "n_resamples": n_resamples}
    return out


def rsvqa_average_ci(
    accuracy: dict[str, Any],
    split: str,
    *,
    weighting: str = "types",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Interval for the RSVQA-LR/HR average, resampling questions within each protocol type so every
    resample keeps the test set's type composition. ``weighting="types"``: mean of the per-type
    accuracies (``average_mean_of_types``); ``"questions"``: weighted by each type's question count
    (``average_question_weighted``)."""
    if weighting not in ("types", "questions"):
        raise ValueError(f"weighting must be 'types' or 'questions', not {weighting!r}")

    correct = np.asarray(accuracy["correct"], dtype=np.float64)
    types = np.asarray(accuracy["types"])
    wanted = [t for t in RSVQA_PROTOCOLS[split.strip().upper()] if t in accuracy["per_type"]]
    if not wanted:
        raise ValueError(f"no RSVQA-{split} protocol types in the accuracy result")
    rng = np.random.default_rng(seed)
    per_type, sizes = [], []
    for ty in wanted:
        v = correct[types == ty]
        per_type.append(v[rng.integers(0, v.size, (n_resamples, v.size))].mean(axis=1))
        sizes.append(v.size)
    weights = np.ones(len(wanted)) if weighting == "types" else np.asarray(sizes, dtype=np.float64)
    return _percentiles(np.average(per_type, axis=0, weights=weights), confidence)


# --------------------------------------------------------------------------- paired (real vs control)


def _paired_summary(real: np.ndarray, control: np.ndarray, confidence: float) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the control arm and of real - control over the same resamples."""
    ok = np.isfinite(real) & np.isfinite(control)
    real, control = real[ok], control[ok]
    if real.size == 0:
        return {}
    return {"control_ci": _percentiles(control, confidence), "delta_ci": _percentiles(real - control, confidence)}


def _resample_weights(n_items: int, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices (R, n), counts (R, n)): how often each item is drawn in each resample."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_items, (n_resamples, n_items))
    weights = np.zeros((n_resamples, n_items))
    np.add.at(weights, (np.arange(n_resamples)[:, None], idx), 1.0)
    return idx, weights


def paired_caption_intervals(
    real: CaptionScores,
    control: CaptionScores,
    *,
    per_image: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    n_resamples_cider: int = DEFAULT_CIDER_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Paired bootstrap of two caption arms scored on the same images (real vs image-swapped control).

    Each resample draws images with replacement and scores *both* arms on that same multiset, so
    the interval of ``real - control`` reflects only the difference the images make. Every corpus
    metric is recomputed as in :func:`caption_intervals` (BLEU exact from statistics, CIDEr re-run
    with its IDF on the first ``n_resamples_cider`` resamples, ROUGE-L a mean; METEOR / SPICE the
    per-image-mean spread centred on the jar's corpus scores). ``per_image`` adds metrics that are
    means of per-image values (e.g. class-mention correctness): ``{name: (real values, control values)}``
    in ``ids`` order.

    Returns ``{metric: {"control_ci": (low, high), "delta_ci": (low, high), "method", "n_resamples"}}``.
    """
    if real.ids != control.ids:
        raise ValueError("paired bootstrap needs both arms scored on the same image ids, in the same order")
    n = len(real.ids)
    if n == 0:
        raise ValueError("bootstrap needs at least one item")
    idx, weights = _resample_weights(n, n_resamples, seed)
    out: dict[str, dict[str, Any]] = {}
    b_real = bleu_from_statistics(weights @ real.bleu_stats)
    b_ctrl = bleu_from_statistics(weights @ control.bleu_stats)
    for k, name in enumerate(BLEU_NAMES):
        out[name] = {**_paired_summary(b_real[:, k], b_ctrl[:, k], confidence),
                     "method": "corpus BLEU from per-image statistics", "n_resamples": n_resamples}

    means: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in real.corpus:
        if name in out or name not in control.corpus:
            continue
        if name == "CIDEr":
            # The first rows of `idx` are exactly cider_resamples' draws (same seed, same stream), so the
            # real arm's values are those of its own interval, computed once.
            r_c = min(n_resamples_cider, n_resamples)
            arms = [cider_resamples(arm, r_c, seed) for arm in (real, control)]
            out[name] = {**_paired_summary(arms[0], arms[1], confidence),
                         "method": "corpus CIDEr recomputed (IDF per resample) for both arms", "n_resamples": len(arms[0])}
            continue
        means[name] = (np.asarray([real.per_image[name][k] for k in real.ids], dtype=np.float64),
                       np.asarray([control.per_image[name][k] for k in control.ids], dtype=np.float64))
    for name, (r, c) in (per_image or {}).items():
        means[name] = (np.asarray(r, dtype=np.float64), np.asarray(c, dtype=np.float64))
    for name, (r, c) in means.items():
        mr, mc = weights @ r / n, weights @ c / n
        summary = _paired_summary(mr, mc, confidence)
        method = "mean of per-image scores (exact)"
        if name in real.corpus and name not in ("ROUGE-L",):
            # Pooled jar scores (METEOR, SPICE): shift the per-image-mean spread onto the corpus scores.
            pr, pc = float(real.corpus[name]), float(control.corpus[name])
            shift_c, shift_d = pc - float(c.mean()), (pr - pc) - float(r.mean() - c.mean())
            summary = {"control_ci": tuple(v + shift_c for v in summary["control_ci"]),
                       "delta_ci": tuple(v + shift_d for v in summary["delta_ci"])}
            method = "spread of the per-image-score mean, centred on the jar's pooled corpus scores (approximate)"
        out[name] = {**summary, "method": method, "n_resamples": n_resamples}
    return out


def paired_cluster_intervals(
    clusters: Sequence[int] | np.ndarray,
    real: Sequence[float] | np.ndarray,
    control: Sequence[float] | np.ndarray,
    specs: dict[str, list[np.ndarray]],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Paired cluster bootstrap for per-question scores grouped by image (VQA real vs control).

    Images (``clusters``: each question's image index 0..m-1) are resampled with replacement and
    every question of a drawn image comes along, in both arms. ``specs`` maps a metric to a list
    of boolean question masks: the metric is the mean over the masks of (sum of scores / number of
    questions) in each mask, so ``[all]`` is overall accuracy, ``[type mask]`` a per-type accuracy,
    ``[presence, comparison, rural_urban]`` the mean of types and ``[their union]`` the
    question-weighted average. A resample in which a mask has no question is left out.

    Returns ``{metric: {"real", "control", "control_ci": (low, high), "delta_ci": (low, high),
    "n_resamples"}}``: point values, intervals, and the number of resamples that entered them.
    """
    cl = np.asarray(clusters, dtype=np.int64)
    r_hits, c_hits = np.asarray(real, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if not (cl.shape == r_hits.shape == c_hits.shape) or cl.size == 0:
        raise ValueError("clusters, real and control need the same non-zero length")
    m = int(cl.max()) + 1
    _, weights = _resample_weights(m, n_resamples, seed)
    ones = np.ones((1, m))
    out: dict[str, dict[str, Any]] = {}
    for name, masks in specs.items():
        def value(hits: np.ndarray, w: np.ndarray) -> np.ndarray:
            vals = []
            for mask in masks:
                a = np.bincount(cl[mask], weights=hits[mask], minlength=m)
                q = np.bincount(cl[mask], minlength=m).astype(np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    vals.append((w @ a) / (w @ q))
            return np.mean(vals, axis=0)

        pr, pc = float(value(r_hits, ones)[0]), float(value(c_hits, ones)[0])
        vr, vc = value(r_hits, weights), value(c_hits, weights)
        out[name] = {"real": pr, "control": pc, **_paired_summary(vr, vc, confidence),
                     "n_resamples": int(np.sum(np.isfinite(vr) & np.isfinite(vc)))}
    return out
