"""Build shards from the sample data bundled in the repository (``data/sample``).

* RSVQA (``data/sample/rsvqa``): 50 Sentinel-2 (RSVQA-LR) + 15 USGS (RSVQA-HR) images with their
  QA; captions are derived from the QA (:mod:`rsmoe.data.rsvqa_captions`). All are RSVQA *train*
  images, so a deterministic held-out split is made: per dataset, images sorted by
  ``sha1(key)`` and the first ``round(20%)`` go to ``val``.
* UCM-Captions (``data/sample/ucm_captions``): 105 images with 5 human captions each (first one as
  ``caption``, all five as ``references``) and the original train/val/test split.

Output: ``train-*.tar``, ``val-*.tar``, ``test-*.tar`` (UCM's test images) and ``manifest.json``.
The manifest stores a fingerprint of the inputs (file names, sizes, annotation hashes, builder
version); :func:`build_sample_shards` returns the existing manifest when it matches.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from rsmoe.data.convert import convert_samples, open_karpathy, open_rsvqa
from rsmoe.data.schema import Sample
from rsmoe.data.shards import read_manifest

logger = logging.getLogger(__name__)

BUILDER_VERSION = 3  # 2: the RSICap-style splitter (UCM parts changed); 3: UCM-Captions records carry their class ('label')
VAL_FRACTION = 0.2
DEFAULT_OUT = "data/shards/sample"
_RSVQA = {
    "lr_sentinel2": ("imagesS2_reduced.json", "questionsS2_reduced.json", "answersS2_reduced.json"),
    "hr_usgs": ("USGS_split_train_images_reduced.json", "USGS_split_train_questions_reduced.json",
                "USGS_split_train_answers_reduced.json"),
}


def sample_root() -> Path:
    """``data/sample`` of the repository (the package lives at ``<repo>/rsmoe/data``)."""
    env = os.environ.get("RSMOE_SAMPLE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "sample"


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256(f"v{BUILDER_VERSION}".encode())
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".png", ".jpg"):
            h.update(str(p.relative_to(root)).encode())
            h.update(str(p.stat().st_size).encode())
            if p.suffix == ".json":
                h.update(p.read_bytes())
    return h.hexdigest()


def _holdout_split(keys: list[str], fraction: float = VAL_FRACTION) -> Callable[[str], str]:
    ranked = sorted(keys, key=lambda k: hashlib.sha1(k.encode()).hexdigest())
    val = set(ranked[: round(fraction * len(ranked))])
    return lambda key: "val" if key in val else "train"


def _rsvqa_sources(root: Path, skipped: Counter[str]) -> list[tuple[int, Iterator[Sample]]]:
    sources = []
    for sub, (im, q, a) in _RSVQA.items():
        d = root / "rsvqa" / sub
        ds = "RSVQA-LR" if sub.startswith("lr") else "RSVQA-HR"
        ids = [x["id"] for x in json.loads((d / im).read_text())["images"] if x.get("active", True)]
        split_fn = _holdout_split([f"{ds}_{i}" for i in ids])
        sources.append(open_rsvqa(d / im, d / q, d / a, d / "images", dataset=ds, split_fn=split_fn, skipped=skipped))
    return sources


def build_sample_shards(out_dir: str | os.PathLike = DEFAULT_OUT, force: bool = False,
                        shard_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """Convert the bundled sample into shards in ``out_dir``; skip if already up to date.

    Returns the manifest (with ``"up_to_date": True`` when nothing had to be rebuilt).
    """
    root = sample_root()
    if not (root / "rsvqa").is_dir() or not (root / "ucm_captions").is_dir():
        raise FileNotFoundError(f"bundled sample not found under {root}; set RSMOE_SAMPLE_DIR or re-clone the repo")
    fp = _fingerprint(root)
    out = Path(out_dir)
    old = read_manifest(out)
    if not force and old and old.get("source_fingerprint") == fp and all(
        (out / name).is_file() for s in old.get("splits", {}).values() for name in s.get("shards", [])
    ):
        old["up_to_date"] = True
        return old
    skipped: Counter[str] = Counter()
    sources = _rsvqa_sources(root, skipped)
    sources.append(open_karpathy(root / "ucm_captions" / "captions.json", root / "ucm_captions" / "images",
                                 dataset="UCM-Captions", skipped=skipped))
    total = sum(n for n, _ in sources)
    chained = itertools.chain.from_iterable(it for _, it in sources)
    manifest = convert_samples((total, chained), out, shard_size=shard_size, desc="sample", skipped=skipped,
                               progress=progress, extra={"source_fingerprint": fp, "source": str(root)})
    manifest["up_to_date"] = False
    return manifest
