"""Split a free-form remote-sensing caption into the three expert sub-captions.

RSICap-style captions read "This is a <kind> image showing <scene>. <objects: counts, colours,
sizes, absolute positions>. <relations between objects>." The rules below turn any caption into
``{"theme", "objects", "relations"}`` without losing text: the caption is cut into sentences and
**every sentence goes to exactly one part**, in its original order.

Sentences: cut after ``.``, ``!`` or ``?`` followed by whitespace or the end (UCM-style " ." with a
space before the full stop counts too; the stray space is removed). Abbreviations are not special-
cased; remote-sensing captions rarely use them.

Each sentence is classified by the first rule that matches:

1. **relations** if it contains a *strong* relational phrase, i.e. language that relates one object
   to another: "left/right of", "next to", "adjacent to", "beside", "between", "surrounded by",
   "near", "close to", "far from", "in front of", "behind", "opposite", "parallel to", "connected",
   "intersect", "cross(es)", "on both/either sides of", "around", "lined with", "leads to", ...
2. **relations** if it contains a *weak* relational word ("along", "across", "through", "beneath",
   "above", "below", "over", "among", "facing", "toward") **and** no object attribute (number, count
   word, colour, size or shape). "There are twelve white buildings along the road." is therefore an
   objects sentence (it is about the buildings' count and colour), while "A road runs along the river."
   is a relation.
3. **theme** if it is a scene statement: it mentions the image itself ("this is", "the image/picture/
   photo/scene", "aerial", "satellite", "high-resolution", "panchromatic") or names a scene/land-use
   category ("... area", "farmland", "residential", "airport", "harbor", "forest", "beach", ...) without
   giving object counts.
4. otherwise **objects**.

Fallback: if no sentence was classified as theme, the first sentence becomes the theme unless it is
a (strong) relation. This keeps short one-sentence captions (UCM, Sydney, RSICD: "There are many
buildings and some green trees.") as the overall description, which is what the theme expert learns.

Sentences in a part are joined with a single space. Parts may be empty strings.
"""
from __future__ import annotations

import re

_SENT_RE = re.compile(r"(?<=[.!?])\s+(?=\S)")

_STRONG_REL = re.compile(
    r"\b(?:(?:to|on|at)\s+the\s+(?:left|right)\s+(?:side\s+)?of|left\s+of|right\s+of|next\s+to|adjacent\s+to|"
    r"beside|besides|between|surrounded\s+by|surrounding|surrounds|near|nearby|close\s+to|far\s+from|"
    r"in\s+front\s+of|behind|opposite|parallel\s+(?:to|with)|connected|connects?|connecting|intersect\w*|"
    r"cross(?:es|ed|ing)?|on\s+(?:both|either|each|two)\s+sides?\s+of|around|lined\s+with|leads?\s+to|"
    r"next\s+door|alongside|in\s+the\s+middle\s+of\s+the\s+(?!image|picture|scene)\w+|"
    r"on\s+top\s+of|under(?:neath)?|inside|within|enclosed\s+by|encircl\w+|border(?:s|ed|ing)?)\b",
    re.I,
)
_WEAK_REL = re.compile(
    r"\b(?:along|across|through|beneath|above|below|over|among|amongst|facing|toward|towards)\b", re.I
)
_NUMBER_WORDS = (
    "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|"
    "sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|dozens?|hundreds?|several|many|"
    "some|few|lots|numerous|multiple|rows?|lines?|pieces?|a\\s+couple"
)
_COLOURS = "white|black|grey|gray|red|green|blue|yellow|brown|orange|purple|pink|dark|light|colou?rful|silver"
_SIZES = "large|small|big|huge|tiny|long|short|wide|narrow|tall|rectangular|square|circular|round|oval|curved|straight"
_OBJ_ATTR = re.compile(rf"\b(?:\d+|{_NUMBER_WORDS}|{_COLOURS}|{_SIZES})\b", re.I)
_COUNT = re.compile(rf"\b(?:\d+|{_NUMBER_WORDS})\b", re.I)

_IMAGE_WORDS = re.compile(
    r"\b(?:this\s+is|it\s+is|here\s+is|the\s+(?:image|picture|photo|scene)|(?:image|picture|photo|scene)\s+"
    r"(?:shows|depicts|contains|of)|aerial|satellite|high[-\s]resolution|panchromatic|remote\s+sensing)\b",
    re.I,
)
_SCENE_WORDS = re.compile(
    r"\b(?:area|region|district|zone|scene|landscape|farmland|cropland|residential|commercial|industrial|"
    r"airport|harbou?r|port|beach|forest|desert|mountain|meadow|chaparral|golf\s+course|baseball\s+(?:field|diamond)|"
    r"stadium|playground|campus|city|town|village|suburb|downtown|countryside|rural|urban|wetland|river|"
    r"freeway|highway|intersection|overpass|runway|parking\s+lot|mobile\s+home\s+park|storage\s+tanks?|"
    r"tennis\s+courts?|church|school|railway\s+station|bridge|pond|lake|sea|ocean|island|viaduct)\b",
    re.I,
)


def split_sentences(text: str) -> list[str]:
    """Cut ``text`` into sentences, normalising whitespace (including UCM's " ." style)."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([.,!?;:])", r"\1", text)
    if not text:
        return []
    return [s.strip() for s in _SENT_RE.split(text) if s.strip()]


def classify_sentence(sentence: str) -> str:
    """Return the part ("theme", "objects" or "relations") one sentence belongs to (rules 1-4)."""
    if _STRONG_REL.search(sentence):
        return "relations"
    if _WEAK_REL.search(sentence) and not _OBJ_ATTR.search(sentence):
        return "relations"
    if _IMAGE_WORDS.search(sentence):
        return "theme"
    if _SCENE_WORDS.search(sentence) and not _COUNT.search(sentence):
        return "theme"
    return "objects"


def split_caption(caption: str) -> dict[str, str]:
    """Split ``caption`` into ``{"theme", "objects", "relations"}`` (rules in the module docstring)."""
    sentences = split_sentences(caption)
    labels = [classify_sentence(s) for s in sentences]
    if sentences and "theme" not in labels and labels[0] != "relations":
        labels[0] = "theme"
    out: dict[str, list[str]] = {"theme": [], "objects": [], "relations": []}
    for s, lab in zip(sentences, labels):
        out[lab].append(s)
    return {k: " ".join(v) for k, v in out.items()}


def normalise_caption(caption: str) -> str:
    """Whitespace-normalised caption (same text the parts are built from)."""
    return " ".join(split_sentences(caption))
