"""Write samples into webdataset tar shards plus a ``manifest.json``.

Shards are named ``<split>-<NNNNNN>.tar``; each holds at most ``max_per_shard`` samples. Everything
is written into a staging directory inside ``out_dir`` and only moved into place (``os.replace``)
once every shard is complete, manifest last, so a reader never sees a half-written shard set and a
crashed conversion leaves the previous one intact.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from rsmoe.data.schema import Sample, validate_record

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class ShardWriter:
    """Streams samples into per-split shards; ``close()`` commits them atomically.

    Use as a context manager: on an exception nothing is committed and the staging dir is removed.
    """

    def __init__(self, out_dir: str | os.PathLike, max_per_shard: int = 1000, extra: Mapping[str, Any] | None = None):
        if max_per_shard < 1:
            raise ValueError("max_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_per_shard = max_per_shard
        self.extra = dict(extra or {})
        self._stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.out_dir))
        self._tars: dict[str, tarfile.TarFile] = {}
        self._in_shard: Counter[str] = Counter()
        self._shards: dict[str, list[str]] = defaultdict(list)
        self._counts: dict[str, Counter[str]] = defaultdict(Counter)
        self._keys: set[str] = set()
        self._closed = False

    def write(self, sample: Sample) -> None:
        reason = validate_record(sample.record)
        if reason is not None:
            raise ValueError(f"sample {sample.key}: {reason}")
        if sample.key in self._keys:
            raise ValueError(f"duplicate sample key {sample.key!r}")
        self._keys.add(sample.key)
        split = sample.record["split"]
        if split not in self._tars or self._in_shard[split] >= self.max_per_shard:
            self._roll(split)
        tar = self._tars[split]
        for ext, data in sample.members().items():
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size = len(data)
            info.mtime = 0  # deterministic bytes: identical inputs give identical shards
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        self._in_shard[split] += 1
        self._counts[split][sample.record["dataset"]] += 1

    def _roll(self, split: str) -> None:
        if split in self._tars:
            self._tars[split].close()
        name = f"{split}-{len(self._shards[split]):06d}.tar"
        self._shards[split].append(name)
        self._tars[split] = tarfile.open(self._stage / name, "w", format=tarfile.USTAR_FORMAT)
        self._in_shard[split] = 0

    def manifest(self) -> dict[str, Any]:
        splits = {
            s: {"samples": sum(c.values()), "datasets": dict(sorted(c.items())), "shards": self._shards[s]}
            for s, c in sorted(self._counts.items())
        }
        datasets: dict[str, dict[str, int]] = defaultdict(dict)
        for s, c in self._counts.items():
            for d, n in c.items():
                datasets[d][s] = n
        return {
            "format": "rsmoe-webdataset-v1",
            "max_per_shard": self.max_per_shard,
            "total": sum(sum(c.values()) for c in self._counts.values()),
            "splits": splits,
            "datasets": {d: dict(sorted(v.items())) for d, v in sorted(datasets.items())},
            **self.extra,
        }

    def close(self) -> dict[str, Any]:
        """Commit: replace the previous shard set in ``out_dir`` by this one; return the manifest."""
        if self._closed:
            raise RuntimeError("ShardWriter already closed")
        self._closed = True
        for tar in self._tars.values():
            tar.close()
        manifest = self.manifest()
        (self._stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        # Remove shards of a previous run first so a smaller re-conversion leaves no stale shards.
        old = self.out_dir / MANIFEST
        if old.exists():
            old.unlink()
        for p in self.out_dir.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            p.unlink()
        for names in self._shards.values():
            for name in names:
                os.replace(self._stage / name, self.out_dir / name)
        os.replace(self._stage / MANIFEST, self.out_dir / MANIFEST)
        shutil.rmtree(self._stage, ignore_errors=True)
        logger.info("wrote %d samples to %s", manifest["total"], self.out_dir)
        return manifest

    def abort(self) -> None:
        self._closed = True
        for tar in self._tars.values():
            tar.close()
        shutil.rmtree(self._stage, ignore_errors=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    max_per_shard: int = 1000,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write all ``samples`` and return the manifest (see :class:`ShardWriter`)."""
    with ShardWriter(out_dir, max_per_shard, extra) as w:
        for s in samples:
            w.write(s)
        return w.close()


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(out_dir) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
