"""VQA answer normalisation, accuracy and the RSVQA LR/HR protocols on hand-computed cases."""

from __future__ import annotations

import pytest

from rsmoe.eval import (
    canonical_type,
    count_bucket,
    normalize_answer,
    rsvqa_protocol,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "qtype", "expected"),
    [
        ("Yes.", None, "yes"),
        ("Yes, there is", "presence", "yes"),
        ("No, there isn't.", "presence", "no"),
        ("Two", "count", "2"),
        ("the road", None, "road"),
        ("twenty-one cars", "count", "21"),
        ("There are no buildings", "count", "0"),
        ("none", "count", "0"),
        ("zero", "count", "0"),
        ("between 1 and 10", "count", "between 1 and 10"),
        ("Between 10 m² and 100 m2", "area", "between 10m2 and 100m2"),
        ("0m2", "area", "0m2"),
        ("1,000m2", "area", "1000m2"),
        ("  Rural  ", "rural_urban", "rural"),
        ("a rural area", "rural_urban", "rural"),
        ("An urban area.", "rural_urban", "urban"),
        ("It is rural", "rural_urban", "rural"),
        ("The area is urban, with many buildings", "rural_urban", "urban"),
        ("rural or urban", "rural_urban", "rural or urban"),  # names both: no answer
        ("not urban", "rural_urban", "not urban"),  # negated: left alone
        ("It isn't rural", "rural_urban", "it isn t rural"),
        ("a rural area", None, "rural area"),  # only rural_urban questions are reduced
        ("2.5", None, "2.5"),
    ],
)
def test_normalize_answer(raw, qtype, expected):
    assert normalize_answer(raw, qtype) == expected


def test_type_aliases():
    assert canonical_type("comp") == "comparison"
    assert canonical_type("Rural/Urban") == "rural_urban"


def test_vqa_accuracy_hand_computed():
    preds = ["Yes.", "Two", "the road", "no", "3", "urban"]
    answers = ["yes", "2", "road", "yes", "4", "urban"]
    types = ["presence", "count", "presence", "comp", "count", "rural_urban"]
    acc = vqa_accuracy(preds, answers, types)
    assert acc["correct"] == [True, True, True, False, False, True]
    assert acc["overall"] == pytest.approx(4 / 6)
    assert acc["per_type"] == {"comparison": 0.0, "count": 0.5, "presence": 1.0, "rural_urban": 1.0}
    assert acc["n_per_type"] == {"comparison": 1, "count": 2, "presence": 2, "rural_urban": 1}
    # "3" vs "4" is wrong exactly but both fall in the "between 1 and 10" bucket.
    assert acc["count_bucketed"] == 1.0


def test_vqa_accuracy_accepts_mappings_and_checks_ids():
    acc = vqa_accuracy({"q1": "yes", "q2": "no"}, {"q1": "yes", "q2": "yes"}, {"q1": "presence", "q2": "presence"})
    assert acc["overall"] == 0.5 and acc["ids"] == ["q1", "q2"]
    with pytest.raises(ValueError, match="ids differ"):
        vqa_accuracy({"q1": "yes"}, {"q2": "yes"}, {"q1": "presence"})
    with pytest.raises(ValueError, match="length mismatch"):
        vqa_accuracy(["yes"], ["yes", "no"], ["presence"])


def test_count_bucket():
    assert count_bucket("none") == "0"
    assert count_bucket("seven") == "between 1 and 10"
    assert count_bucket("11") == "between 11 and 100"
    assert count_bucket("1,001") == "more than 1000"
    assert count_bucket("many") is None


def test_rsvqa_lr_protocol_hand_computed():
    # presence 2/3, comparison 1/2, rural_urban 1/1, count 0/2 (kept out of the average).
    preds = ["yes", "no", "yes", "yes", "no", "rural", "5", "none"]
    answers = ["yes", "no", "no", "yes", "yes", "rural", "between 11 and 100", "3"]
    types = ["presence", "presence", "presence", "comp", "comp", "rural_urban", "count", "count"]
    r = rsvqa_protocol(preds, answers, types, "LR")
    assert r["presence"] == pytest.approx(2 / 3)
    assert r["comparison"] == pytest.approx(0.5)
    assert r["rural_urban"] == 1.0
    assert r["average"] == r["average_mean_of_types"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)  # RSGPT's convention
    assert r["average_question_weighted"] == pytest.approx((2 + 1 + 1) / 6)  # GeoChat's: 4 right of 6 protocol questions
    assert r["count"] == 0.0 and r["count_bucketed"] == 0.0
    assert r["overall_all_questions"] == pytest.approx(4 / 8)


def test_rsvqa_hr_protocol_excludes_count_and_area():
    preds = ["yes", "no", "yes", "no", "0m2", "4"]
    answers = ["yes", "yes", "yes", "no", "between 10m2 and 100m2", "4"]
    types = ["presence", "presence", "comp", "comp", "area", "count"]
    r = rsvqa_protocol(preds, answers, types, "HR")
    assert r["average"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["average_question_weighted"] == pytest.approx(3 / 4)  # equal type counts: the two averages agree
    assert r["area"] == 0.0 and r["count"] == 1.0
    assert "rural_urban" not in r and r["missing_types"] == []
    with pytest.raises(ValueError, match="LR' or 'HR"):
        rsvqa_protocol(preds, answers, types, "XL")


def test_rural_urban_sentences_score_as_their_class():
    preds = ["a rural area", "It is urban.", "an urban area", "rural or urban"]
    acc = vqa_accuracy(preds, ["rural", "urban", "rural", "rural"], ["rural_urban"] * 4)
    assert acc["correct"] == [True, True, False, False]
