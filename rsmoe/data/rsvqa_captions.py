"""Derive theme/objects/relations captions for an RSVQA image from its question-answer pairs.

RSVQA questions are generated from OpenStreetMap with a handful of templates, so they can be parsed
back into facts and re-worded as caption sentences (docs/design.md §4):

* **theme** - the sensor and resolution, the ``rural_urban`` answer when there is one (RSVQA-LR), and
  the land uses that are present (residential/commercial/industrial areas, farmland, forest, water,
  grass, park, ...), e.g. "This is a Sentinel-2 satellite image at 10 m resolution of a rural area.
  The land use includes farmland, forest and water areas." RSVQA-HR has no rural/urban question, so
  its theme is sensor/resolution plus the land uses present.
* **objects** - ``count``, ``presence`` and ``area`` answers about a single kind of object, e.g.
  "There are 14 commercial buildings.", "There is no water area.", "Buildings cover 3787 m²."
  One fact per object kind (count beats area beats presence); present objects first, then absent
  ones, plain kinds ("buildings") before size/shape-qualified ones ("small buildings"), then in the
  order the questions appear; at most ``max_objects`` sentences.
* **relations** - ``comp`` answers that are "yes" ("There are more roads than water areas.", "The
  number of roads equals the number of buildings.") and presence/count facts whose object carries a
  spatial qualifier ("next to", "on the left of", "at the top of", ...), e.g. "There are 7 residential
  buildings at the bottom of the park." A "no" comparison is not turned into text because it is
  ambiguous (not more may mean equal). At most ``max_relations`` sentences.

The result is deterministic: it depends only on the QA list order and content. Inactive questions
must be filtered by the caller (the RSVQA converter does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

_TAIL = r"(?:\s+in\s+the\s+image)?\s*\??$"
_PRESENCE = [
    re.compile(r"^is\s+there\s+(?:a|an)\s+(?P<obj>.+?)(?:\s+present)?" + _TAIL, re.I),
    re.compile(r"^is\s+(?:a|an)\s+(?P<obj>.+?)\s+present" + _TAIL, re.I),
    re.compile(r"^are\s+there\s+(?:any\s+)?(?P<obj>.+?)(?:\s+present)?" + _TAIL, re.I),
]
_COUNT = [
    re.compile(r"^what\s+is\s+the\s+(?:number|amount)\s+of\s+(?P<obj>.+?)" + _TAIL, re.I),
    re.compile(r"^how\s+many\s+(?P<obj>.+?)(?:\s+are\s+there)?" + _TAIL, re.I),
]
_AREA = [re.compile(r"^what\s+is\s+the\s+area\s+covered\s+by\s+(?P<obj>.+?)" + _TAIL, re.I)]
_COMP_MORE = re.compile(r"^are\s+there\s+(?P<op>more|less|fewer)\s+(?P<a>.+?)\s+than\s+(?P<b>.+?)" + _TAIL, re.I)
_COMP_EQ = re.compile(
    r"^is\s+the\s+number\s+of\s+(?P<a>.+?)\s+equal\s+to\s+the\s+number\s+of\s+(?P<b>.+?)" + _TAIL, re.I
)
_SPATIAL = re.compile(
    r"\b(?:next\s+to|on\s+the\s+(?:left|right)\s+of|at\s+the\s+(?:top|bottom)\s+of|near|between|"
    r"surrounded\s+by|left\s+of|right\s+of|above|below)\b",
    re.I,
)
_MODIFIER = re.compile(r"^(?:small|medium|large|circular|square|rectangular)\s", re.I)
_LAND_USE = re.compile(
    r"^(?:(?:small|medium|large|circular|square|rectangular)\s+)*"
    r"(?P<lu>residential\s+areas?|commercial\s+areas?|industrial\s+areas?|farmlands?|forests?|woods?|"
    r"water\s+areas?|grass\s+areas?|parks?|meadows?|orchards?|greenfields?|scrubs?|vineyards?|"
    r"allotments?|cemeter(?:y|ies)|construction\s+areas?|retail\s+areas?)$",
    re.I,
)


@dataclass
class _Fact:
    obj: str
    kind: str  # count | area | presence
    value: str
    order: int


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _split_head(phrase: str) -> tuple[str, str]:
    """("roads", " on the left of a water area") for a spatially qualified object phrase."""
    m = _SPATIAL.search(phrase)
    return (phrase[: m.start()].rstrip(), " " + phrase[m.start():]) if m else (phrase, "")


def _singular(phrase: str) -> str:
    phrase, qual = _split_head(phrase)
    words = phrase.split()
    last = words[-1]
    if last.endswith("ies"):
        last = last[:-3] + "y"
    elif last.endswith("s") and not last.endswith("ss"):
        last = last[:-1]
    return " ".join(words[:-1] + [last]) + qual


def _plural(phrase: str) -> str:
    phrase, qual = _split_head(phrase)
    words = phrase.split()
    last = words[-1]
    if last.endswith("s"):
        return phrase + qual
    if last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join(words[:-1] + [last]) + qual


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _match(patterns: Iterable[re.Pattern[str]], question: str) -> re.Match[str] | None:
    for p in patterns:
        m = p.match(question)
        if m:
            return m
    return None


def _yes(answer: str) -> bool | None:
    a = answer.strip().lower().rstrip(".")
    return True if a == "yes" else False if a == "no" else None


def _number(answer: str) -> int | None:
    m = re.match(r"^\s*(\d+)\s*(?:m2|m²)?\s*$", answer)
    return int(m.group(1)) if m else None


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _fmt_resolution(res: str | None) -> str | None:
    if not res:
        return None
    m = re.match(r"^\s*(\d*\.?\d+)\s*m\s*$", str(res))
    if not m:
        return str(res)
    v = float(m.group(1))
    return f"{v:g} m" if v >= 1 else f"{v * 100:.0f} cm"


def _fact_sentence(f: _Fact) -> str:
    if f.kind == "count":
        n = int(f.value)
        if n == 0:
            return f"There are no {_plural(f.obj)}."
        if n == 1:
            return f"There is one {_singular(f.obj)}."
        return f"There are {n} {_plural(f.obj)}."
    if f.kind == "area":
        n = int(f.value)
        return f"{_plural(f.obj)[:1].upper()}{_plural(f.obj)[1:]} cover {n} m²." if n else f"There are no {_plural(f.obj)}."
    return f"There is {_article(_singular(f.obj))}." if f.value == "yes" else f"There is no {_singular(f.obj)}."


def _present(f: _Fact) -> bool:
    return f.value == "yes" if f.kind == "presence" else int(f.value) > 0


def qa_to_parts(
    qa: Iterable[Mapping[str, str]],
    *,
    sensor: str | None = None,
    resolution: str | None = None,
    max_objects: int = 8,
    max_relations: int = 5,
) -> dict[str, str]:
    """Return ``{"theme", "objects", "relations"}`` sentences derived from RSVQA QA pairs.

    ``sensor`` is the RSVQA ``sensor`` field ("S2", "ULTRACAM_EAGLE_FALCON", ...) and ``resolution``
    its ``res_x`` ("10m", ".1524m"); both only phrase the theme.
    """
    rural_urban: str | None = None
    facts: dict[str, _Fact] = {}
    rel_sentences: list[str] = []
    rel_seen: set[str] = set()
    rank = {"presence": 0, "area": 1, "count": 2}

    def add_rel(sentence: str) -> None:
        if sentence not in rel_seen:
            rel_seen.add(sentence)
            rel_sentences.append(sentence)

    for i, item in enumerate(qa):
        q = _clean(str(item.get("question", "")))
        a = _clean(str(item.get("answer", "")))
        qtype = str(item.get("type", "")).lower()
        if qtype == "rural_urban":
            if a.lower() in ("rural", "urban"):
                rural_urban = a.lower()
            continue
        if qtype in ("comp", "comparison"):
            yes = _yes(a)
            m = _COMP_MORE.match(q)
            if m and yes:
                x, y = _clean(m["a"]), _clean(m["b"])
                if m["op"].lower() == "more":
                    add_rel(f"There are more {x} than {y}.")
                else:  # canonical form: "more y than x" would change the wording; keep "fewer"
                    add_rel(f"There are fewer {x} than {y}.")
                continue
            m = _COMP_EQ.match(q)
            if m and yes:
                add_rel(f"The number of {_clean(m['a'])} equals the number of {_clean(m['b'])}.")
            continue
        m = None
        kind = ""
        if qtype == "count":
            m, kind = _match(_COUNT, q), "count"
        elif qtype == "area":
            m, kind = _match(_AREA, q), "area"
        elif qtype == "presence":
            m, kind = _match(_PRESENCE, q), "presence"
        if m is None:
            continue
        obj = _clean(m["obj"])
        if kind == "presence":
            yes = _yes(a)
            if yes is None:
                continue
            value = "yes" if yes else "no"
        else:
            n = _number(a)
            if n is None:
                continue
            value = str(n)
        fact = _Fact(obj, kind, value, i)
        if _SPATIAL.search(obj):
            if _present(fact):  # absent spatial configurations say little; keep the positive ones
                add_rel(_fact_sentence(fact))
            continue
        key = _singular(obj).lower()
        old = facts.get(key)
        if old is None or rank[kind] > rank[old.kind]:
            facts[key] = _Fact(obj, kind, value, old.order if old else i)

    # Present before absent; plain kinds ("buildings") before modified ones ("small buildings").
    ordered = sorted(facts.values(), key=lambda f: (not _present(f), bool(_MODIFIER.match(f.obj)), f.order))
    land_use: list[str] = []
    for f in ordered:
        m = _LAND_USE.match(f.obj)
        if m and _present(f):
            lu = _plural(_singular(m["lu"].lower()))
            lu = {"farmlands": "farmland", "forests": "forest", "woods": "woodland"}.get(lu, lu)
            if lu not in land_use:
                land_use.append(lu)

    sensor_txt = None
    if sensor:
        sensor_txt = "a Sentinel-2 satellite image" if sensor.upper().startswith("S2") else "a high-resolution aerial image"
    res_txt = _fmt_resolution(resolution)
    theme = "This is " + (sensor_txt or "a remote sensing image")
    if res_txt:
        theme += f" at {res_txt} resolution"
    theme += f" of {_article(rural_urban + ' area')}." if rural_urban else "."
    if land_use:
        theme += f" The land use includes {_join(land_use)}."
    objects = [_fact_sentence(f) for f in ordered[:max_objects]]
    return {"theme": theme, "objects": " ".join(objects), "relations": " ".join(rel_sentences[:max_relations])}


def parts_to_caption(parts: Mapping[str, str]) -> str:
    """The full caption: theme, objects and relations sentences in that order."""
    return " ".join(p for p in (parts.get("theme", ""), parts.get("objects", ""), parts.get("relations", "")) if p)
