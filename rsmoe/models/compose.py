"""Caption composition: the experts' sub-captions joined theme -> objects -> relations."""

from __future__ import annotations

import re
from collections.abc import Collection

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(text.strip()) if s.strip()]


def _key(sentence: str) -> str:
    # Duplicates differ only by case, spacing or final punctuation more often than not.
    return re.sub(r"[^a-z0-9 ]", "", sentence.lower()).strip()


def compose_caption(parts: dict[str, str], order: list[str], truncated: Collection[str] = ()) -> str:
    """Join sub-captions in `order`, dropping sentences already said and ending each with a period.

    `truncated`: experts whose generation stopped at the token limit. Their last sentence, if
    unfinished (no final punctuation) and not their only one, is a cut-off fragment and is left out.
    """
    seen: set[str] = set()
    out: list[str] = []
    for name in order:
        sentences = _sentences(parts.get(name, ""))
        if name in truncated and len(sentences) > 1 and sentences[-1][-1] not in ".!?":
            sentences = sentences[:-1]
        for s in sentences:
            k = _key(s)
            if not k or k in seen:
                continue
            seen.add(k)
            out.append(s if s[-1] in ".!?" else s + ".")
    return " ".join(out)
