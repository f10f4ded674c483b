"""Bootstrap intervals: contain the point estimate, reproducible with a seed."""

from __future__ import annotations

import numpy as np
import pytest

from rsmoe.eval import (
    bootstrap_ci,
    bootstrap_mean_ci,
    rsvqa_average_ci,
    vqa_accuracy,
    vqa_intervals,
)


def test_mean_interval_contains_point_and_is_seeded():
    values = np.random.default_rng(0).random(100)
    lo, hi = bootstrap_mean_ci(values, seed=3)
    assert lo <= values.mean() <= hi
    assert (lo, hi) == bootstrap_mean_ci(values, seed=3)
    assert (lo, hi) != bootstrap_mean_ci(values, seed=4)
    # The generic form with the same statistic gives an interval of similar width.
    lo2, hi2 = bootstrap_ci(lambda idx: float(values[idx].mean()), len(values), n_resamples=500, seed=3)
    assert lo2 <= values.mean() <= hi2
    assert abs((hi2 - lo2) - (hi - lo)) < 0.05


def test_degenerate_inputs():
    assert bootstrap_mean_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_mean_ci([])


def test_vqa_intervals():
    rng = np.random.default_rng(1)
    types = ["presence"] * 60 + ["comp"] * 40 + ["rural_urban"] * 20
    answers = ["yes"] * 120
    preds = ["yes" if rng.random() < 0.8 else "no" for _ in answers]
    acc = vqa_accuracy(preds, answers, types)
    iv = vqa_intervals(acc, n_resamples=500, seed=0)
    for key in ("overall", "presence", "comparison", "rural_urban"):
        point = acc["overall"] if key == "overall" else acc["per_type"][key]
        assert iv[key]["low"] <= point <= iv[key]["high"]
    avg = np.mean([acc["per_type"][t] for t in ("presence", "comparison", "rural_urban")])
    lo, hi = rsvqa_average_ci(acc, "LR", n_resamples=500, seed=0)
    assert lo <= avg <= hi
    assert (lo, hi) == rsvqa_average_ci(acc, "LR", n_resamples=500, seed=0)
    # Question-weighted: the same within-type resamples, weighted 60/40/20, so the interval brackets
    # the accuracy over all protocol questions and is computed from a direct loop exactly.
    weighted = np.mean(acc["correct"])
    lo_w, hi_w = rsvqa_average_ci(acc, "LR", weighting="questions", n_resamples=300, seed=1)
    assert lo_w <= weighted <= hi_w
    rng = np.random.default_rng(1)
    correct, ctypes = np.asarray(acc["correct"], float), np.asarray(acc["types"])
    per_type = [correct[ctypes == t][rng.integers(0, n, (300, n))].mean(axis=1)
                for t, n in (("presence", 60), ("comparison", 40), ("rural_urban", 20))]
    direct = (60 * per_type[0] + 40 * per_type[1] + 20 * per_type[2]) / 120
    assert (lo_w, hi_w) == pytest.approx(tuple(np.quantile(direct, [0.025, 0.975])))
    with pytest.raises(ValueError, match="weighting"):
        rsvqa_average_ci(acc, "LR", weighting="mean")
