"""Streaming loader over rsmoe webdataset shards (training and evaluation).

Shards are read sequentially as tar streams (local files, ``http(s)://`` URLs, and ``pipe:``
commands only when ``allow_pipe=True``); members are grouped into samples by key.

**Training mode** (``batches_per_epoch`` set). Each of the ``world_size x num_workers`` workers
draws shards *with replacement* from a seeded RNG (``seed``, ``epoch``, global worker id); when there
are at least as many shards as workers, worker ``g`` draws only from ``shards[g::W]`` so workers read
disjoint shards. Samples pass through a shuffle buffer (``shuffle_buffer``) and are batched inside
the worker. Each rank yields exactly ``batches_per_epoch`` full batches per epoch: worker ``w`` of
``n`` produces ``bpe // n`` (+1 for ``w < bpe % n``) batches and then stops, whatever the shard sizes,
so ranks can never disagree on the number of steps (no DDP hang). torch's DataLoader fetches from
workers round-robin, so global batch ``i`` is batch ``i // n`` of worker ``i % n``: the stream is
deterministic for a given (seed, epoch, rank, world_size, num_workers).

**Eval mode** (``batches_per_epoch=None``). One pass over the shards in order. Sample ``i`` (global
index over all records of all shards, in order) belongs to rank ``i % world_size``; the ``j``-th sample
of a rank goes to worker ``j % num_workers``. Every rank reads every shard but decodes only its own
samples; the union over ranks is every sample exactly once, and each worker keeps its last partial batch.

**Bad data** never stops the loader: corrupt/missing image, bad JSON, a record failing
:func:`~rsmoe.data.schema.validate_record`, an empty caption, a truncated tar or an unreadable shard is
skipped, counted by reason and logged (one warning per reason per process, naming shard and key).
Workers send their counts with each batch under ``"_skipped"``; :meth:`Loader.stats` sums them.

**Resume.** :meth:`Loader.state_dict` is ``{"epoch", "batches_consumed"}``. After
:meth:`Loader.load_state_dict`, the next pass of that epoch deterministically re-generates the same
stream and drops the first ``batches_consumed`` batches (images are still decoded so that a corrupt
image shifts batches exactly as it did the first time), so the remaining batches are exactly the ones
the interrupted run would have seen (with workers, each worker fast-forwards only its own batches
and the worker roles are rotated so the round-robin order continues where it stopped). Skip counts seen while fast-forwarding are not re-reported.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import subprocess
import tarfile
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rsmoe.data.schema import IMAGE_EXTS, validate_record
from rsmoe.errors import Halted

logger = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt_image", "missing_image", "bad_json", "invalid_record", "empty_caption",
                "truncated_tar", "unreadable_shard")
_warned: set[str] = set()


class NoValidDataError(Halted):
    """Every shard this worker may read yields no valid sample: waiting longer would hang the run."""


def _skip(counts: Counter[str], reason: str, where: str, detail: str = "") -> None:
    counts[reason] += 1
    if reason not in _warned:  # once per reason per process: a bad shard must not flood the log
        _warned.add(reason)
        logger.warning("skipping %s (%s)%s; further '%s' skips are only counted", where, reason,
                       f": {detail}" if detail else "", reason)


# --------------------------------------------------------------------------- shard lists
def expand_shards(shards: str | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Expand brace patterns (``{000..009}``) and globs; local paths, ``http(s)://`` or ``pipe:``.

    Raises ``ValueError`` for ``pipe:`` without ``allow_pipe`` or another URL scheme, and
    ``FileNotFoundError`` when a local pattern matches no file.
    """
    specs = [shards] if isinstance(shards, str) else list(shards)
    if not specs:
        raise ValueError("no shards given")
    out: list[str] = []
    for spec in specs:
        spec = str(spec)
        if spec.startswith("pipe:"):
            if not allow_pipe:
                raise ValueError(f"refusing shard {spec!r}: 'pipe:' runs a shell command; "
                                 "pass allow_pipe=True if you trust this shard list")
            out.append(spec)
            continue
        if spec.startswith(("http://", "https://")):
            out.extend(braceexpand(spec))
            continue
        if spec.startswith("file://"):
            spec = spec[len("file://"):]
        elif "://" in spec:
            raise ValueError(f"unsupported shard URL {spec!r}: only local paths and http(s):// URLs are supported")
        matched: list[str] = []
        for pat in braceexpand(spec):
            if os.path.isdir(pat):
                matched.extend(sorted(glob.glob(os.path.join(pat, "*.tar"))))
            elif glob.has_magic(pat):
                matched.extend(sorted(glob.glob(pat)))
            elif os.path.exists(pat):
                matched.append(pat)
        if not matched:
            raise FileNotFoundError(f"shard pattern {spec!r} matched no file (cwd {os.getcwd()}); "
                                    "run `rsmoe prepare` or `rsmoe convert ...` first, or fix the path")
        out.extend(matched)
    return out


def _open_stream(url: str) -> BinaryIO:
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 - opt-in via allow_pipe
        assert proc.stdout is not None
        return proc.stdout  # type: ignore[return-value]
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=60)  # noqa: S310 - scheme checked in expand_shards
    return open(url, "rb")


def iter_tar_groups(url: str, counts: Counter[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for consecutive tar members sharing a key; errors are counted."""
    try:
        stream = _open_stream(url)
    except OSError as e:
        _skip(counts, "unreadable_shard", url, str(e))
        return
    key: str | None = None
    group: dict[str, bytes] = {}
    n_members = 0
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base = os.path.basename(name)
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                k = os.path.join(os.path.dirname(name), stem)
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                n_members += 1
                if k != key:
                    if key is not None:
                        yield key, group
                    key, group = k, {}
                group[ext.lower()] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # The group being read when the stream broke is incomplete: drop it.
        _skip(counts, "truncated_tar" if n_members else "unreadable_shard", url, repr(e))
        return
    if key is not None:
        yield key, group


def parse_group(url: str, key: str, group: dict[str, bytes], counts: Counter[str]) -> dict[str, Any] | None:
    """Check one raw sample (JSON + image bytes); return ``{key, image, record}`` or count a skip."""
    where = f"{url}:{key}"
    raw = group.get("json")
    if raw is None:
        _skip(counts, "invalid_record", where, "no .json member")
        return None
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _skip(counts, "bad_json", where, str(e))
        return None
    reason = validate_record(rec)
    if reason == "empty caption":
        _skip(counts, "empty_caption", where)
        return None
    if reason is not None:
        _skip(counts, "invalid_record", where, reason)
        return None
    image = next((group[e] for e in IMAGE_EXTS if e in group), None)
    if image is None:
        _skip(counts, "missing_image", where, f"members: {sorted(group)}")
        return None
    return {"key": key, "image": image, "record": rec}


# --------------------------------------------------------------------------- preprocessing
def preprocess_image(data: bytes, image_size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Decode, convert to RGB, bicubic-resize to S x S, scale to [0,1], normalise; CHW float32."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32)
    arr = (arr * (1.0 / 255.0) - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples into the batch dict the trainer and evaluator consume."""
    recs = [s["record"] for s in samples]
    return {
        "pixel_values": torch.from_numpy(np.stack([s["pixel"] for s in samples])),
        "key": [s["key"] for s in samples],
        "caption": [r["caption"] for r in recs],
        "parts": [dict(r["parts"]) for r in recs],
        "qa": [list(r["qa"]) for r in recs],
        "references": [list(r.get("references") or [r["caption"]]) for r in recs],
        "dataset": [r["dataset"] for r in recs],
        "instruction": [r.get("instruction") for r in recs],
    }


# --------------------------------------------------------------------------- the stream
@dataclass
class _Config:
    shards: list[str]
    batch_size: int
    image_size: int
    mean: np.ndarray
    std: np.ndarray
    rank: int
    world_size: int
    seed: int
    shuffle_buffer: int
    batches_per_epoch: int | None
    num_workers: int


class _ShardStream(IterableDataset):
    """Per-worker generator of collated batches (see module docstring for the semantics)."""

    def __init__(self, cfg: _Config):
        super().__init__()
        self.cfg = cfg
        self.epoch = 0
        self.skip_batches = 0  # global batches to drop (resume)

    def _decode(self, s: dict[str, Any], counts: Counter[str]) -> dict[str, Any] | None:
        c = self.cfg
        try:
            s["pixel"] = preprocess_image(s["image"], c.image_size, c.mean, c.std)
        except Exception as e:  # PIL raises many types for corrupt data; none may stop training
            _skip(counts, "corrupt_image", s["key"], repr(e))
            return None
        s.pop("image")
        return s

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.cfg.batches_per_epoch is None:
            yield from self._eval_iter(wid, nw)
        else:
            yield from self._train_iter(wid, nw)

    # -- training: resampled, shuffled, fixed number of batches
    def _train_iter(self, wid: int, nw: int) -> Iterator[dict[str, Any]]:
        c = self.cfg
        assert c.batches_per_epoch is not None
        # DataLoader always starts its round-robin at worker 0; after skipping k batches the next
        # batch belongs to logical worker k % nw, so physical worker p plays logical (p + k) % nw.
        wid = (wid + self.skip_batches) % nw
        quota = c.batches_per_epoch // nw + (1 if wid < c.batches_per_epoch % nw else 0)
        skip = self.skip_batches // nw + (1 if wid < self.skip_batches % nw else 0)
        g, total_workers = c.rank * nw + wid, c.world_size * nw
        pool = c.shards[g::total_workers] if len(c.shards) >= total_workers else c.shards
        rng = random.Random(f"{c.seed}/{self.epoch}/{g}/{total_workers}")
        counts: Counter[str] = Counter()

        def samples() -> Iterator[dict[str, Any]]:
            barren = 0  # consecutive shard reads that gave no valid sample
            buf: list[dict[str, Any]] = []
            while True:
                url = pool[rng.randrange(len(pool))]
                got = 0
                for key, group in iter_tar_groups(url, counts):
                    s = parse_group(url, key, group, counts)
                    if s is None:
                        continue
                    got += 1
                    if len(buf) < c.shuffle_buffer:
                        buf.append(s)
                        continue
                    i = rng.randrange(len(buf))
                    buf[i], s = s, buf[i]
                    yield s
                barren = 0 if got else barren + 1
                if barren >= max(20, 3 * len(pool)):
                    raise NoValidDataError(f"no valid sample in {barren} consecutive shard reads of {pool[:3]}"
                                           f"{'...' if len(pool) > 3 else ''} (skips so far: {dict(counts)}); "
                                           "fix or re-convert these shards, or drop them from data.train_shards")

        produced = 0
        batch: list[dict[str, Any]] = []
        it = samples()
        # Samples whose JSON parses but whose image never decodes keep `samples()` busy forever; a run of
        # failures this long means (nearly) nothing is decodable: stop with a clear error, not a spin.
        failed, max_failed = 0, 1000 + 2 * c.shuffle_buffer
        while produced < quota:
            s = self._decode(next(it), counts)
            if s is None:
                failed += 1
                if failed >= max_failed:
                    raise NoValidDataError(f"{failed} consecutive samples of {pool[:3]}{'...' if len(pool) > 3 else ''} "
                                           f"had undecodable images (skips so far: {dict(counts)}); "
                                           "fix or re-convert these shards, or drop them from data.train_shards")
                continue
            failed = 0
            batch.append(s)
            if len(batch) == c.batch_size:
                out = collate(batch)
                batch = []
                produced += 1
                if produced <= skip:
                    counts.clear()  # already reported by the run that saved the checkpoint
                    continue
                out["_skipped"] = dict(counts)
                counts.clear()
                yield out

    # -- eval: one ordered pass, disjoint by sample index
    def _eval_iter(self, wid: int, nw: int) -> Iterator[dict[str, Any]]:
        c = self.cfg
        counts: Counter[str] = Counter()
        batch: list[dict[str, Any]] = []
        index = 0
        for url in c.shards:
            for key, group in iter_tar_groups(url, counts if (wid == 0 and c.rank == 0) else Counter()):
                i = index
                index += 1
                if i % c.world_size != c.rank or (i // c.world_size) % nw != wid:
                    continue
                s = parse_group(url, key, group, counts)
                if s is None or self._decode(s, counts) is None:
                    continue
                batch.append(s)
                if len(batch) == c.batch_size:
                    out = collate(batch)
                    out["_skipped"] = dict(counts)
                    counts.clear()
                    batch = []
                    yield out
        if batch:
            out = collate(batch)
            out["_skipped"] = dict(counts)
            yield out
        elif counts:
            yield {"_skipped": dict(counts), "_stats_only": True}


def _ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001
    # A job-wide SIGTERM/SIGUSR2 (SLURM preemption) must reach the trainer, not kill the workers it
    # still needs to finish the step and write its checkpoint. torch installs its own worker SIGTERM
    # handler after the fork, so this has to run here, in worker_init_fn.
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: the kernel SIGKILLs this worker when its trainer dies (kill -9, a crash), instead of
    leaving it to torch's parent watchdog (a poll every few seconds, and only when the worker idles)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the watchdog remains
        pass


def _identity(x: Any) -> Any:
    return x


class Loader:
    """Iterable over batches; see the module docstring for training/eval/resume semantics."""

    def __init__(self, stream: _ShardStream, num_workers: int, epoch: int = 0):
        self._stream = stream
        self.num_workers = num_workers
        self.epoch = epoch
        self._consumed = 0
        self._resume: tuple[int, int] | None = None
        self._stats: Counter[str] = Counter()

    @property
    def training(self) -> bool:
        return self._stream.cfg.batches_per_epoch is not None

    def __len__(self) -> int:
        if not self.training:
            raise TypeError("an eval-mode Loader has no fixed length")
        return int(self._stream.cfg.batches_per_epoch)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate next (changes the shard draw and shuffle order).

        A pending resume position (``load_state_dict``) is kept only if it is for this epoch.
        """
        self.epoch = epoch
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None
        self._consumed = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, int(state["batches_consumed"]))
        self._consumed = 0

    def stats(self) -> dict[str, int]:
        """Skipped samples/shards by reason, summed over all workers since this Loader was built."""
        return {r: int(self._stats.get(r, 0)) for r in sorted(set(SKIP_REASONS) | set(self._stats))}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch and self.training:
            skip = self._resume[1]
        self._resume = None
        self._stream.epoch = self.epoch
        self._stream.skip_batches = skip
        self._consumed = skip
        if self.num_workers > 0:
            source: Any = DataLoader(self._stream, batch_size=None, num_workers=self.num_workers,
                                     collate_fn=_identity, persistent_workers=False,
                                     worker_init_fn=_ignore_stop_signals)
        else:
            source = self._stream
        for item in source:
            for reason, n in item.pop("_skipped", {}).items():
                self._stats[reason] += n
            if item.pop("_stats_only", False):
                continue
            self._consumed += 1
            yield item


def build_loader(
    shards: str | Sequence[str],
    *,
    batch_size: int,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 100,
    batches_per_epoch: int | None = None,
    allow_pipe: bool = False,
    epoch: int = 0,
) -> Loader:
    """Build a streaming :class:`Loader` (training mode iff ``batches_per_epoch`` is set)."""
    if batch_size < 1 or image_size < 1:
        raise ValueError("batch_size and image_size must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if batches_per_epoch is not None and batches_per_epoch < 1:
        raise ValueError("batches_per_epoch must be >= 1 (or None for eval mode)")
    if len(image_mean) != 3 or len(image_std) != 3:
        raise ValueError("image_mean and image_std need 3 values (RGB)")
    urls = expand_shards(shards, allow_pipe=allow_pipe)
    if batches_per_epoch is None:
        urls = sorted(urls)  # the sample index must be identical on every rank
    cfg = _Config(
        shards=urls, batch_size=batch_size, image_size=image_size,
        mean=np.asarray(image_mean, dtype=np.float32), std=np.asarray(image_std, dtype=np.float32),
        rank=rank, world_size=world_size, seed=seed, shuffle_buffer=max(1, shuffle_buffer),
        batches_per_epoch=batches_per_epoch, num_workers=num_workers,
    )
    loader = Loader(_ShardStream(cfg), num_workers=num_workers, epoch=epoch)
    loader.set_epoch(epoch)
    return loader
