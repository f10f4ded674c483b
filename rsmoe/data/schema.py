"""The one sample schema shared by every dataset.

A sample in a shard is a group of tar members with the same key: the image (``<key>.png`` or
``<key>.jpg``) and a JSON record (``<key>.json``)::

    {
      "caption": str,                       # non-empty full caption (training target)
      "parts": {"theme": str, "objects": str, "relations": str},  # per-expert sub-captions
      "qa": [{"question": str, "answer": str, "type": str}],
      "dataset": str, "split": str, "image_id": str,
      "instruction": str | None,            # optional prompt (RSICap ``text_input``)
      "references": [str, ...],             # optional: all human captions, for evaluation
      "label": str                          # optional: the image's scene class (UCM-Captions)
    }

Parts may be empty strings (a short caption may have no relational sentence), but the caption may not.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

PARTS: tuple[str, ...] = ("theme", "objects", "relations")
IMAGE_EXTS: tuple[str, ...] = ("png", "jpg", "jpeg")
REQUIRED_STR_FIELDS: tuple[str, ...] = ("caption", "dataset", "split", "image_id")


@dataclass
class Sample:
    """One converted sample, ready to be written to a shard."""

    key: str
    image: bytes
    image_ext: str  # "png" or "jpg"
    record: dict[str, Any]

    def members(self) -> dict[str, bytes]:
        return {
            self.image_ext: self.image,
            "json": json.dumps(self.record, ensure_ascii=False, sort_keys=True).encode("utf-8"),
        }


def validate_record(rec: Any) -> str | None:
    """Return ``None`` when ``rec`` follows the schema, else a short human-readable reason."""
    if not isinstance(rec, Mapping):
        return f"record is {type(rec).__name__}, expected a JSON object"
    for field in REQUIRED_STR_FIELDS:
        if field not in rec:
            return f"missing field '{field}'"
        if not isinstance(rec[field], str):
            return f"field '{field}' is {type(rec[field]).__name__}, expected str"
    if not rec["caption"].strip():
        return "empty caption"
    parts = rec.get("parts")
    if not isinstance(parts, Mapping):
        return "missing or non-object field 'parts'"
    for p in PARTS:
        if not isinstance(parts.get(p), str):
            return f"parts.{p} missing or not a str"
    qa = rec.get("qa")
    if not isinstance(qa, list):
        return "missing or non-list field 'qa'"
    for i, item in enumerate(qa):
        if not isinstance(item, Mapping):
            return f"qa[{i}] is not an object"
        for f in ("question", "answer", "type"):
            if not isinstance(item.get(f), str):
                return f"qa[{i}].{f} missing or not a str"
    instr = rec.get("instruction")
    if instr is not None and not isinstance(instr, str):
        return "field 'instruction' must be a str or null"
    refs = rec.get("references")
    if refs is not None and (not isinstance(refs, list) or not all(isinstance(r, str) for r in refs)):
        return "field 'references' must be a list of str"
    label = rec.get("label")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        return "field 'label' must be a non-empty str when present"
    return None


def make_record(
    *,
    caption: str,
    parts: Mapping[str, str],
    dataset: str,
    split: str,
    image_id: str,
    qa: list[dict[str, str]] | None = None,
    instruction: str | None = None,
    references: list[str] | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Build a schema record (and check it, so converters fail loudly on their own bugs)."""
    rec: dict[str, Any] = {
        "caption": caption,
        "parts": {p: parts.get(p, "") for p in PARTS},
        "qa": list(qa or []),
        "dataset": dataset,
        "split": split,
        "image_id": str(image_id),
        "instruction": instruction,
    }
    if references is not None:
        rec["references"] = list(references)
    if label is not None:
        rec["label"] = label
    reason = validate_record(rec)
    if reason is not None:
        raise ValueError(f"invalid record for {dataset}/{image_id}: {reason}")
    return rec


def safe_key(*parts: str) -> str:
    """A webdataset key: no dots (webdataset splits key/extension at the first dot), no slashes."""
    raw = "_".join(str(p) for p in parts)
    return "".join(c if (c.isalnum() or c in "-_") else "_" for c in raw)
