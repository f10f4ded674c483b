"""Class-mention accuracy: does a caption name its image's scene class?

For a dataset whose samples carry a scene class (``label``; UCM-Captions), the caption's class is
the *first* class word or synonym it names, scanning left to right; it is right when it equals the
image's class. A caption that names no class word counts as wrong. A model that writes the same
caption for every image therefore scores exactly the share of the class that caption names
(chance level), whatever its BLEU or CIDEr.

Matching runs on the caption lower-cased with every non-alphanumeric character turned into a
space; a synonym matches whole words only (``plane`` does not match inside ``airplane``). When two
synonyms start at the same word, the longer one wins. The synonym table is in docs/evaluation.md.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

from rsmoe.eval.bootstrap import bootstrap_mean_ci

# Residential density (UCM has three residential classes): a density word directly followed by a
# residential noun, optionally with one of _DENSITY_FILLERS in between ("densely populated
# residential area", "sparse houses"). "residential" alone names no class; "buildings" is the
# buildings class, never a residential one ("dense buildings" -> buildings).
_DENSITY = {
    "denseresidential": ("dense", "densely"),
    "mediumresidential": ("medium",),
    "sparseresidential": ("sparse", "sparsely", "spase"),  # "spase" is a typo the UCM captions use
}
_DENSITY_FILLERS = ("populated", "built", "packed")
_RESIDENTIAL_NOUNS = ("residential", "residence", "residences", "house", "houses", "home", "homes", "housing")


def _residential(words: Sequence[str]) -> tuple[str, ...]:
    out = []
    for d in words:
        for n in _RESIDENTIAL_NOUNS:
            out.append(f"{d} {n}")
            out += [f"{d} {f} {n}" for f in _DENSITY_FILLERS]
    return tuple(out)


# UC Merced Land Use, class -> synonyms (whole words, plural forms listed). A synonym names the
# scene or its defining object (planes for airplane, boats for harbor, tanks for storagetanks); context
# words that occur in many classes' captions (trees, water, sea, sand, road, cars, field) are not listed.
UCM_SYNONYMS: dict[str, tuple[str, ...]] = {
    "agricultural": ("agricultural", "agriculture", "farmland", "farmlands", "cropland", "croplands", "farm", "farms",
                     "crop", "crops", "cultivated land", "cultivated fields"),
    "airplane": ("airplane", "airplanes", "aeroplane", "aeroplanes", "plane", "planes", "aircraft", "aircrafts", "jet", "jets", "airliner", "airliners"),
    "baseballdiamond": ("baseball", "baseball diamond", "baseball diamonds", "baseball field", "baseball fields", "diamond"),
    "beach": ("beach", "beaches", "shore", "shoreline", "seashore", "coast", "coastline"),
    "buildings": ("building", "buildings"),
    "chaparral": ("chaparral", "shrub", "shrubs", "shrubland", "bush", "bushes", "scrub", "scrubland"),
    "denseresidential": _residential(_DENSITY["denseresidential"]),
    "forest": ("forest", "forests", "woods", "woodland", "woodlands"),
    "freeway": ("freeway", "freeways", "highway", "highways", "motorway", "motorways", "expressway", "expressways"),
    "golfcourse": ("golf", "golf course", "golf courses"),
    "harbor": ("harbor", "harbors", "harbour", "harbours", "marina", "marinas", "boat", "boats", "ship", "ships",
               "yacht", "yachts", "dock", "docks"),
    "intersection": ("intersection", "intersections", "crossroad", "crossroads"),
    "mediumresidential": _residential(_DENSITY["mediumresidential"]),
    "mobilehomepark": ("mobile home", "mobile homes", "mobile home park", "mobile home parks", "mobile house",
                       "mobile houses", "trailer park", "trailer parks"),
    "overpass": ("overpass", "overpasses", "viaduct", "viaducts", "flyover", "flyovers"),
    "parkinglot": ("parking", "parking lot", "parking lots", "car park", "car parks"),
    "river": ("river", "rivers"),
    "runway": ("runway", "runways", "airstrip", "airstrips"),
    "sparseresidential": _residential(_DENSITY["sparseresidential"]) + ("villa", "villas"),
    "storagetanks": ("storage tank", "storage tanks", "oil tank", "oil tanks", "tank", "tanks"),
    "tenniscourt": ("tennis", "tennis court", "tennis courts"),
}

CLASS_TABLES: dict[str, dict[str, tuple[str, ...]]] = {"UC Merced Land Use (21 classes)": UCM_SYNONYMS}


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def _compile(table: Mapping[str, Sequence[str]]) -> list[tuple[str, re.Pattern[str]]]:
    out = []
    for cls, syns in table.items():
        # Longest first, so a regex alternation prefers "storage tanks" over "storage tank".
        alts = sorted({_normalise(s) for s in syns}, key=len, reverse=True)
        out.append((cls, re.compile(r"(?<![0-9a-z])(?:" + "|".join(re.escape(a) for a in alts) + r")(?![0-9a-z])")))
    return out


@lru_cache(maxsize=16)
def _compiled(frozen: tuple[tuple[str, tuple[str, ...]], ...]) -> list[tuple[str, re.Pattern[str]]]:
    return _compile(dict(frozen))


def first_class_mentioned(caption: str, table: Mapping[str, Sequence[str]] = UCM_SYNONYMS) -> str | None:
    """The class whose word or synonym occurs first in ``caption`` (None if it names none)."""
    compiled = _compiled(tuple((cls, tuple(syns)) for cls, syns in table.items()))
    text = _normalise(caption)
    best: tuple[int, int, str] | None = None  # (start, -length, class)
    for cls, pat in compiled:
        m = pat.search(text)
        if m and (best is None or (m.start(), -(m.end() - m.start())) < best[:2]):
            best = (m.start(), -(m.end() - m.start()), cls)
    return None if best is None else best[2]


def table_for(labels: Sequence[str | None]) -> tuple[str, dict[str, tuple[str, ...]]] | None:
    """The class table covering every label (None when a label is missing or in no table)."""
    if not labels or any(not lab for lab in labels):
        return None
    wanted = set(labels)
    for name, table in CLASS_TABLES.items():
        if wanted <= set(table):
            return name, table
    return None


def class_mention(
    captions: Mapping[str, str], labels: Mapping[str, str], table: Mapping[str, Sequence[str]] = UCM_SYNONYMS
) -> dict[str, Any]:
    """Class-mention accuracy of ``captions`` (id -> text) against ``labels`` (id -> class).

    Returns ``{"accuracy", "n", "correct": {id: bool}, "mentioned": {id: class | None},
    "no_class_word": share of captions naming no class}``.
    """
    if set(captions) != set(labels):
        raise ValueError(f"caption and label ids differ: {sorted(map(str, set(captions) ^ set(labels)))[:5]}")
    if not captions:
        raise ValueError("no captions to score")
    unknown = sorted({lab for lab in labels.values() if lab not in table})
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not classes of the synonym table")
    mentioned = {k: first_class_mentioned(c, table) for k, c in captions.items()}
    correct = {k: mentioned[k] == labels[k] for k in captions}
    return {
        "accuracy": float(np.mean(list(correct.values()))),
        "n": len(correct),
        "correct": correct,
        "mentioned": mentioned,
        "no_class_word": float(np.mean([m is None for m in mentioned.values()])),
    }


def add_class_mention(
    section: dict[str, Any], items: Sequence[Mapping[str, Any]], *, n_resamples: int, seed: int
) -> dict[str, tuple[str, ...]] | None:
    """Add ``class_mention_accuracy`` (with a bootstrap interval) to a caption report section when
    every item carries a ``label`` of one class table; returns that table (None: not a class dataset).

    ``items`` need ``key``, ``caption`` and ``label``, in the section's image order.
    """
    found = table_for([it.get("label") for it in items])
    if found is None:
        return None
    name, table = found
    res = class_mention({it["key"]: it["caption"] for it in items}, {it["key"]: it["label"] for it in items}, table)
    section["metrics"]["class_mention_accuracy"] = res["accuracy"]
    section["class_mention"] = {"classes": name, "n": res["n"], "no_class_word": res["no_class_word"],
                                "mentioned": res["mentioned"]}
    section.setdefault("notes", []).append(
        "class_mention_accuracy: the first class word or synonym the caption names is the image's class "
        "(docs/evaluation.md); naming none counts as wrong")
    if n_resamples:
        lo, hi = bootstrap_mean_ci([float(res["correct"][it["key"]]) for it in items], n_resamples=n_resamples, seed=seed)
        section.setdefault("intervals", {})["class_mention_accuracy"] = {
            "low": lo, "high": hi, "method": "mean of per-image correctness (exact)", "n_resamples": n_resamples}
    return table
