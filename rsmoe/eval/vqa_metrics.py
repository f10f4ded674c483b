"""VQA accuracy with a written-down answer normalisation, and the RSVQA LR/HR protocols.

Accuracy is exact match after :func:`normalize_answer` (one reference answer per question, as in
RSVQA / RSIVQA; no VQAv2-style soft "3 of 10 annotators" scoring). Values are fractions in
[0, 1]; reports multiply by 100.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# RSVQA file type names -> canonical names used in results.
TYPE_ALIASES = {
    "comp": "comparison",
    "comparison": "comparison",
    "presence": "presence",
    "count": "count",
    "area": "area",
    "rural_urban": "rural_urban",
    "rural/urban": "rural_urban",
    "ruralurban": "rural_urban",
}
# RS literature (GeoChat, RSGPT tables): the average covers only these types; count and area
# are reported separately.
RSVQA_PROTOCOLS = {
    "LR": ("presence", "comparison", "rural_urban"),
    "HR": ("presence", "comparison"),
}
RSVQA_SEPARATE = ("count", "area")
# RSVQA-LR quantises counts into these answers (Lobry et al., 2020).
COUNT_BUCKETS = ("0", "between 1 and 10", "between 11 and 100", "between 101 and 1000", "more than 1000")

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19,
}
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}
_ARTICLES = {"a", "an", "the"}
_YES = {"yes", "yeah", "yep", "true", "correct"}
_NO = {"no", "nope", "false", "incorrect"}
_RURAL_URBAN = {"rural", "urban"}
# After punctuation -> space, "isn't" is "isn t": the lone "t" marks the negation.
_NEGATIONS = {"not", "no", "neither", "nor", "never", "t", "nt", "isnt", "non"}


def canonical_type(qtype: str) -> str:
    """Map a question type name to its canonical form (``comp`` -> ``comparison``)."""
    key = qtype.strip().lower().replace(" ", "_").replace("-", "_")
    return TYPE_ALIASES.get(key, key)


def _number_words(tokens: list[str]) -> list[str]:
    """Replace number words by digits: 'two' -> '2', 'twenty one' -> '21', 'hundred' after a digit."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in _TENS:
            val = _TENS[tok]
            if i + 1 < len(tokens) and tokens[i + 1] in _UNITS and 0 < _UNITS[tokens[i + 1]] < 10:
                val += _UNITS[tokens[i + 1]]
                i += 1
            out.append(str(val))
        elif tok in _UNITS:
            out.append(str(_UNITS[tok]))
        elif tok in ("hundred", "thousand") and out and out[-1].isdigit():
            out[-1] = str(int(out[-1]) * (100 if tok == "hundred" else 1000))
        else:
            out.append(tok)
        i += 1
    return out


def normalize_answer(s: str, qtype: str | None = None) -> str:
    """Normalise a VQA answer (prediction or ground truth) for exact-match scoring.

    Steps, in order:

    1. Lower-case; ``m²`` -> ``m2``; thousands separators dropped (``1,000`` -> ``1000``).
    2. Punctuation -> space, except a decimal point between digits (``2.5`` stays).
    3. Split on whitespace; drop the articles ``a``, ``an``, ``the``.
    4. Number words -> digits: ``zero``..``nineteen``, tens, ``twenty one`` / ``twenty-one`` ->
       ``21``, ``<n> hundred|thousand``.
    5. A number followed by a unit ``m2`` / ``m`` / ``square meters`` is glued: ``10 m2`` -> ``10m2``.
    6. Yes/no: an answer whose first word is ``yes`` (or yeah/yep/true/correct) becomes ``yes``,
       ``no`` (or nope/false/incorrect) becomes ``no``: ``"Yes, there is"`` -> ``yes``.
       Skipped for ``count`` questions, where ``no`` means a number (step 7).
    7. ``qtype == "count"``: ``none``, ``nothing``, ``no`` / ``no <noun>...`` and ``there are no
       ...`` -> ``0``; an answer holding exactly one number reduces to it (``"2 buildings"`` ->
       ``2``); answers already in RSVQA-LR bucket form ("between 1 and 10") are left alone.
    8. ``qtype == "rural_urban"``: an answer naming exactly one of ``rural`` / ``urban`` and no
       negation (not, no, neither, nor, isn't ...) becomes that word: ``"a rural area"``, ``"It is
       rural."``, ``"Urban area"`` -> ``rural`` / ``urban``; ``"rural or urban"`` and ``"not
       urban"`` stay as they are (and so never match).
    9. Whitespace collapsed, joined by single spaces.
    """
    qt = canonical_type(qtype) if qtype else None
    s = s.strip().lower().replace("²", "2").replace("square meters", "m2").replace("square metres", "m2")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)  # keep decimal points only
    s = re.sub(r"[^\w\s.]|_", " ", s)
    tokens = [t for t in s.split() if t not in _ARTICLES]
    tokens = _number_words(tokens)
    glued: list[str] = []
    for tok in tokens:
        if tok in ("m2", "m", "sqm") and glued and re.fullmatch(r"\d+(\.\d+)?", glued[-1]):
            glued[-1] += "m2" if tok in ("m2", "sqm") else "m"
        else:
            glued.append(tok)
    tokens = glued
    if not tokens:
        return ""

    if qt == "count":
        if tokens[0] in ("none", "nothing", "no") or tokens[:3] == ["there", "are", "no"] or tokens[:3] == ["there", "is", "no"]:
            return "0"
        joined = " ".join(tokens)
        if joined in COUNT_BUCKETS:
            return joined
        numbers = [t for t in tokens if re.fullmatch(r"\d+(\.\d+)?", t)]
        if len(numbers) == 1:
            return numbers[0]
        return joined

    if qt == "rural_urban":
        named = {t for t in tokens if t in _RURAL_URBAN}
        if len(named) == 1 and not any(t in _NEGATIONS for t in tokens):
            return named.pop()

    if tokens[0] in _YES:
        return "yes"
    if tokens[0] in _NO:
        return "no"
    return " ".join(tokens)


def count_bucket(answer: str) -> str | None:
    """RSVQA-LR count bucket of a (normalised) count answer, or None if it is not a count.

    Numbers map to 0 / between 1 and 10 / between 11 and 100 / between 101 and 1000 / more than
    1000; an answer already in bucket form is returned as is.
    """
    a = normalize_answer(answer, "count")
    if a in COUNT_BUCKETS:
        return a
    if not re.fullmatch(r"\d+(\.\d+)?", a):
        return None
    n = float(a)
    if n == 0:
        return COUNT_BUCKETS[0]
    if n <= 10:
        return COUNT_BUCKETS[1]
    if n <= 100:
        return COUNT_BUCKETS[2]
    if n <= 1000:
        return COUNT_BUCKETS[3]
    return COUNT_BUCKETS[4]


def _as_lists(
    preds: Sequence[str] | Mapping[Any, str],
    answers: Sequence[str] | Mapping[Any, str],
    types: Sequence[str] | Mapping[Any, str],
) -> tuple[list[Any], list[str], list[str], list[str]]:
    if isinstance(preds, Mapping):
        if not isinstance(answers, Mapping) or not isinstance(types, Mapping):
            raise ValueError("preds, answers and types must all be mappings or all sequences")
        if set(preds) != set(answers) or set(preds) != set(types):
            missing = sorted(map(str, (set(answers) | set(types)) ^ set(preds)))
            raise ValueError(f"question ids differ between preds, answers and types: {missing[:5]}")
        keys = list(preds)
        return keys, [preds[k] for k in keys], [answers[k] for k in keys], [types[k] for k in keys]
    if not (len(preds) == len(answers) == len(types)):
        raise ValueError(f"length mismatch: {len(preds)} preds, {len(answers)} answers, {len(types)} types")
    return list(range(len(preds))), list(preds), list(answers), list(types)


def vqa_accuracy(
    preds: Sequence[str] | Mapping[Any, str],
    answers: Sequence[str] | Mapping[Any, str],
    types: Sequence[str] | Mapping[Any, str],
) -> dict[str, Any]:
    """Exact-match accuracy after :func:`normalize_answer`, per question type and overall.

    ``preds``, ``answers`` and ``types`` are parallel lists or mappings with the same ids. Types
    are canonicalised (``comp`` -> ``comparison``).

    Returns ``{"overall", "n", "per_type": {type: acc}, "n_per_type": {type: n}, "correct":
    [bool per question], "types": [canonical type per question], "ids": [...]}``, plus
    ``"count_bucketed"`` (accuracy after mapping both sides to RSVQA-LR count buckets) when there
    are count questions.
    """
    ids, p, a, t = _as_lists(preds, answers, types)
    if not ids:
        raise ValueError("no questions to score")
    ctypes = [canonical_type(x) for x in t]
    correct = [
        normalize_answer(pi, ti) == normalize_answer(ai, ti) and normalize_answer(ai, ti) != ""
        for pi, ai, ti in zip(p, a, ctypes)
    ]
    per_type: dict[str, float] = {}
    n_per_type: dict[str, int] = {}
    for ty in sorted(set(ctypes)):
        sel = [c for c, x in zip(correct, ctypes) if x == ty]
        per_type[ty] = float(np.mean(sel))
        n_per_type[ty] = len(sel)
    out: dict[str, Any] = {
        "overall": float(np.mean(correct)),
        "n": len(correct),
        "per_type": per_type,
        "n_per_type": n_per_type,
        "correct": correct,
        "types": ctypes,
        "ids": ids,
    }
    count_idx = [i for i, x in enumerate(ctypes) if x == "count"]
    if count_idx:
        hits = []
        for i in count_idx:
            gb = count_bucket(a[i])
            hits.append(gb is not None and count_bucket(p[i]) == gb)
        out["count_bucketed"] = float(np.mean(hits))
    return out


def rsvqa_protocol(
    preds: Sequence[str] | Mapping[Any, str],
    answers: Sequence[str] | Mapping[Any, str],
    types: Sequence[str] | Mapping[Any, str],
    split: str,
) -> dict[str, Any]:
    """RSVQA accuracies as the RS literature reports them.

    ``split="LR"``: average over presence, comparison and rural_urban; ``"HR"``: over presence and
    comparison. Count and area (and count_bucketed) are reported alongside but never enter the
    average. Papers average differently, so both are returned: ``average`` (= ``average_mean_of_types``)
    is the plain mean of the per-type accuracies (RSGPT's convention); ``average_question_weighted``
    weights each type by its number of questions, i.e. the accuracy over all protocol-type questions
    (GeoChat's). ``overall_all_questions`` is the plain accuracy over every question.
    """
    key = split.strip().upper()
    if key not in RSVQA_PROTOCOLS:
        raise ValueError(f"split must be 'LR' or 'HR', got {split!r}")
    acc = vqa_accuracy(preds, answers, types)
    wanted = RSVQA_PROTOCOLS[key]
    present = [ty for ty in wanted if ty in acc["per_type"]]
    if not present:
        raise ValueError(f"no {'/'.join(wanted)} questions: cannot compute the RSVQA-{key} average")
    missing = [ty for ty in wanted if ty not in acc["per_type"]]
    if missing:
        logger.warning("RSVQA-%s: no questions of type %s; averaging over %s", key, missing, present)
    out: dict[str, Any] = {ty: acc["per_type"][ty] for ty in present}
    out["average"] = float(np.mean([acc["per_type"][ty] for ty in present]))
    out["average_mean_of_types"] = out["average"]
    n_present = sum(acc["n_per_type"][ty] for ty in present)
    out["average_question_weighted"] = float(sum(acc["per_type"][ty] * acc["n_per_type"][ty] for ty in present) / n_present)
    for ty in RSVQA_SEPARATE:
        if ty in acc["per_type"]:
            out[ty] = acc["per_type"][ty]
    if "count_bucketed" in acc:
        out["count_bucketed"] = acc["count_bucketed"]
    out["overall_all_questions"] = acc["overall"]
    out["protocol"] = (f"RSVQA-{key}: average over {', '.join(wanted)} (mean of the type accuracies, and weighted by "
                       "question count); count and area reported separately")
    out["missing_types"] = missing
    out["n_per_type"] = acc["n_per_type"]
    return out
