"""Caption composition: the experts' sub-captions joined theme -> objects -> relations."""

from __future__ import annotations

import re

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(text.strip()) if s.strip()]


def _key(sentence: str) -> str:
    # Duplicates differ only by case, spacing or final punctuation more often than not.
    return re.sub(r"[^a-z0-9 ]", "", sentence.lower()).strip()


def compose_caption(parts: dict[str, str], order: list[str]) -> str:
    """Join sub-captions in `order`, dropping sentences already said and ending each with a period."""
    seen: set[str] = set()
    out: list[str] = []
    for name in order:
        for s in _sentences(parts.get(name, "")):
            k = _key(s)
            if not k or k in seen:
                continue
            seen.add(k)
            out.append(s if s[-1] in ".!?" else s + ".")
    return " ".join(out)
