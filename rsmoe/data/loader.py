"""Streaming loader over rsmoe webdataset shards (training and evaluation), built from webdataset stages.

**What webdataset does.** The shard list (``wds.SimpleShardList``), the per-DataLoader-worker shard split
(``wds.split_by_worker``), opening shards (``gopen``: local files, ``http(s)://`` through ``curl``,
``pipe:`` commands), reading tar streams and grouping members into samples by key
(``wds.tarfile_samples``), the shuffle buffer (``wds.shuffle``), batching (``wds.batched``) and the
stage composition (``wds.DataPipeline``); brace expansion of shard patterns (``expand_urls``).

**What rsmoe adds** (the small stages below): local globs and directories in :func:`expand_shards`,
``pipe:`` only with ``allow_pipe=True``; a split by *data-parallel* rank (``wds.split_by_node`` reads the
global rank, but every rank of one expert-parallel group must read the same batches); a seeded
with-replacement shard sampler; skip-and-count of bad data by reason; decoding to normalised pixels;
the fixed number of batches per epoch; the exact resume position; the eval-mode split by sample index.

**Training mode** (``batches_per_epoch`` set). Each of the ``world_size x num_workers`` workers draws
shards *with replacement* from an RNG seeded by (``seed``, ``epoch``, global worker id); when there are
at least as many shards as workers, the shard list is first split by rank and then by worker, so workers
read disjoint shards. Samples pass through a seeded shuffle buffer (``shuffle_buffer``), are decoded and
batched inside the worker. Each rank yields exactly ``batches_per_epoch`` full batches per epoch: global
batch ``i`` is made by worker ``i % n`` (``n`` = max(1, num_workers)), which makes exactly its batches
``i < batches_per_epoch`` and stops, whatever the shard sizes, so ranks can never disagree on the number
of steps (no DDP hang). The stream is deterministic for a given (seed, epoch, rank, world_size, num_workers).

**Eval mode** (``batches_per_epoch=None``). One pass over the shards in sorted order. Sample ``i`` (global
index over all sample groups of all shards, valid or not) belongs to rank ``i % world_size``; the ``j``-th
sample of a rank goes to worker ``j % num_workers``. Every rank reads every shard but parses and decodes
only its own samples; the union over ranks is every sample exactly once, and each worker keeps its last
partial batch. ``rsmoe eval``'s ``scan_keys`` counts the same index with :func:`iter_tar_groups`.

**Bad data** never stops the loader: a corrupt/missing image, bad JSON, a record failing
:func:`~rsmoe.data.schema.validate_record`, an empty caption, a truncated tar (the stream broke after
its first member header; the sample being read is dropped) or an unreadable shard is skipped, counted by
reason and logged (one warning per reason per process, naming shard and key). Workers send their counts
with each batch under ``"_skipped"``; :meth:`Loader.stats` sums them. When nothing valid can be read,
training raises :class:`NoValidDataError` instead of spinning.

**Resume.** :meth:`Loader.state_dict` is ``{"epoch", "batches_consumed"}``. After
:meth:`Loader.load_state_dict`, the next pass of that epoch deterministically re-generates the same
stream; each worker drops its own batches ``i < batches_consumed`` (images are still decoded so that a
corrupt image shifts batches exactly as it did the first time) and the main process restores the global
order ``i`` (the DataLoader always starts its round-robin at worker 0), so the remaining batches are
exactly the ones the interrupted run would have seen. Skip counts seen while fast-forwarding are not
re-reported.
"""
from __future__ import annotations

import atexit
import glob
import io
import json
import logging
import os
import random
import re
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import (
    base_plus_ext,
    group_by_keys,
    tar_file_expander,
    url_opener,
)

from rsmoe.data.schema import IMAGE_EXTS, validate_record
from rsmoe.errors import Halted

logger = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt_image", "missing_image", "bad_json", "invalid_record", "empty_caption",
                "truncated_tar", "unreadable_shard")
_warned: set[str] = set()
_DUPLICATE = "__duplicate__"  # marks a sample group in which a member name occurred twice


class NoValidDataError(Halted):
    """Every shard this worker may read yields no valid sample: waiting longer would hang the run."""


def _skip(counts: Counter[str], reason: str, where: str, detail: str = "") -> None:
    counts[reason] += 1
    if reason not in _warned:  # once per reason per process: a bad shard must not flood the log
        _warned.add(reason)
        logger.warning("skipping %s (%s)%s; further '%s' skips are only counted", where, reason,
                       f": {detail}" if detail else "", reason)


def _brief(urls: Sequence[str]) -> str:
    return f"{list(urls[:3])}{'...' if len(urls) > 3 else ''}"


# --------------------------------------------------------------------------- shard lists
_PATTERN_SEP = re.compile(r"\s*::\s*")


def _braces(spec: str) -> list[str]:
    try:  # webdataset's expansion: {000..009} braces and ${NAME} from the WDS_NAME environment variable
        return expand_urls(spec)
    except (AssertionError, KeyError) as e:
        raise ValueError(f"shard pattern {spec!r}: {e}; set it or remove the ${{...}} reference") from None


def expand_shards(shards: str | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Expand shard specs into a list of shard URLs.

    A spec is a brace pattern (``{000..009}``), a glob, a directory (its ``*.tar``), an ``http(s)://``
    URL or a ``pipe:`` command; several specs may be given as a list or joined by ``' :: '``.
    Raises ``ValueError`` for ``pipe:`` without ``allow_pipe`` or another URL scheme, and
    ``FileNotFoundError`` when a local pattern matches no file.
    """
    specs = [shards] if isinstance(shards, str) else list(shards)
    parts = [p for s in specs for p in _PATTERN_SEP.split(str(s).strip()) if p]
    if not parts:
        raise ValueError("no shards given")
    out: list[str] = []
    for spec in parts:
        if spec.startswith("pipe:") and not allow_pipe:
            raise ValueError(f"refusing shard {spec!r}: 'pipe:' runs a shell command; "
                             "pass allow_pipe=True if you trust this shard list")
        if spec.startswith(("pipe:", "http://", "https://")):  # opened by webdataset's gopen
            out.extend(_braces(spec))
            continue
        if spec.startswith("file://"):
            spec = spec[len("file://"):]
        elif "://" in spec:
            raise ValueError(f"unsupported shard URL {spec!r}: only local paths and http(s):// URLs are supported")
        matched: list[str] = []
        for pat in _braces(spec):
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


# --------------------------------------------------------------------------- reading one shard
class _ShardFaults:
    """webdataset exception handler for one shard: remembers what broke instead of raising."""

    _DUP = re.compile(r"^(.*): duplicate file name in tar file ")

    def __init__(self) -> None:
        self.members = 0  # member headers read: a break after the first one is a truncated tar
        self.last_key: str | None = None  # sample key of the last member header read
        self.error: BaseException | None = None
        self.duplicates: set[str] = set()

    def count_member(self, fname: str) -> bool:  # webdataset's select_files hook, called per member header
        self.members += 1
        self.last_key = base_plus_ext(fname)[0]
        return True

    def __call__(self, exn: BaseException) -> bool:
        m = self._DUP.match(str(exn.args[0])) if isinstance(exn, ValueError) and exn.args else None
        if m:  # keep reading; parse_group rejects that sample
            self.duplicates.add(base_plus_ext(m.group(1))[0])
            return True
        if self.error is None:
            self.error = exn
        return False  # a tar stream cannot be resynchronised after an error: stop reading this shard


class _StreamEnd:
    """A shard's byte stream that can tell, once tarfile has stopped, whether the archive ended properly.

    tarfile stops without an error at a header that is cut short or garbled (after the first one), so a
    tar cut at a block boundary would pass as complete; a proper end is a zero block with only zero
    padding after it.
    """

    def __init__(self, raw: Any):
        self.raw = raw
        self.tail = b""  # the last 512 bytes read

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.tail = (self.tail + data)[-512:] if len(data) < 512 else data[-512:]
        return data

    def ended_properly(self) -> bool:
        try:
            rest = self.read()  # what tarfile left unread: only zero padding in a proper archive
        except OSError:
            return False
        return len(self.tail) == 512 and not self.tail.strip(b"\0") and not rest.strip(b"\0")

    def close(self) -> None:
        self.raw.close()

    def __repr__(self) -> str:
        return repr(self.raw)


def iter_tar_groups(url: str, counts: Counter[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for each sample group of one shard; shard faults are counted.

    These are the stages of ``wds.tarfile_samples`` (open, expand the tar, group by key) run per shard
    with an rsmoe handler, plus an end-of-archive check between opening and expanding: a broken shard's
    incomplete last group is dropped here (not counted as a bad sample, nor merged with the next shard's
    first group) and the shard is counted once as truncated or unreadable.
    """
    faults = _ShardFaults()
    streams: list[_StreamEnd] = []

    def opened(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in sources:
            streams.append(_StreamEnd(source["stream"]))
            yield {**source, "stream": streams[-1]}

    files = tar_file_expander(opened(url_opener([{"url": url}], handler=faults)), handler=faults,
                              select_files=faults.count_member)
    pending: tuple[str, dict[str, bytes]] | None = None
    for sample in group_by_keys(files, handler=faults):
        if pending is not None:
            yield pending
        key = sample["__key__"]
        group = {k: v for k, v in sample.items() if not k.startswith("__")}
        if key in faults.duplicates:
            group[_DUPLICATE] = b""
        pending = (key, group)
    if faults.error is None and streams and not streams[0].ended_properly():
        faults.error = EOFError("the archive stops without its end-of-archive blocks (cut short or garbled)")
    for stream in streams:
        try:
            stream.close()
        except OSError as e:  # a pipe: command that failed
            faults.error = faults.error or e
    if faults.error is not None:
        # The last group is complete only if the stream broke inside a member of the next one.
        if pending is not None and (faults.last_key is None or faults.last_key == pending[0]):
            pending = None
        _skip(counts, "truncated_tar" if faults.members else "unreadable_shard", url, repr(faults.error))
    if pending is not None:
        yield pending


def parse_group(url: str, key: str, group: dict[str, bytes], counts: Counter[str]) -> dict[str, Any] | None:
    """Check one raw sample (JSON + image bytes); return ``{key, url, image, record}`` or count a skip."""
    where = f"{url}:{key}"
    if _DUPLICATE in group:
        _skip(counts, "invalid_record", where, "a member name occurs twice in this sample")
        return None
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
    return {"key": key, "url": url, "image": image, "record": rec}


# --------------------------------------------------------------------------- preprocessing
def preprocess_image(data: bytes, image_size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Decode, convert to RGB, bicubic-resize to S x S, scale to [0,1], normalise; CHW float32."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BICUBIC)
        hwc = np.asarray(im, dtype=np.float32)
    # (x / 255 - mean) / std, computed in this order (bit-identical to the plain expression) straight
    # into the CHW output: one pass and no temporaries.
    out = np.multiply(hwc.transpose(2, 0, 1), np.float32(1.0 / 255.0), out=np.empty((3, *hwc.shape[:2]), np.float32))
    out -= mean.reshape(3, 1, 1)
    out /= std.reshape(3, 1, 1)
    return out


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


# --------------------------------------------------------------------------- rsmoe's pipeline stages
def split_by_rank(src: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    """``wds.split_by_node`` with an explicit (data-parallel) rank instead of the global one."""
    return islice(src, rank, None, world_size)


def resample_shards(src: Iterable[dict[str, str]], rng: random.Random) -> Iterator[dict[str, str]]:
    """Draw shards from this worker's list with replacement, forever, from a seeded RNG."""
    pool = [s["url"] for s in src]
    while True:
        yield {"url": pool[rng.randrange(len(pool))]}


def train_samples(src: Iterable[dict[str, str]], counts: Counter[str], max_barren: int) -> Iterator[dict[str, Any]]:
    """Valid raw samples of the drawn shards; NoValidDataError after ``max_barren`` shards in a row gave none."""
    barren: list[str] = []  # consecutive shard reads that gave no valid sample
    for shard in src:
        url = shard["url"]
        got = 0
        for key, group in iter_tar_groups(url, counts):
            s = parse_group(url, key, group, counts)
            if s is not None:
                got += 1
                yield s
        if got:
            barren.clear()
        else:
            barren.append(url)
        if len(barren) >= max_barren:
            raise NoValidDataError(f"no valid sample in {len(barren)} consecutive shard reads of "
                                   f"{_brief(sorted(set(barren)))} (skips so far: {dict(counts)}); "
                                   "fix or re-convert these shards, or drop them from data.train_shards")


def eval_samples(src: Iterable[dict[str, str]], counts: Counter[str], rank: int, world_size: int,
                 worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """This worker's valid raw samples of one ordered pass: global sample i goes to rank i % world_size."""
    shard_counts = counts if (rank == 0 and worker == 0) else Counter()  # shard faults: counted once
    index = 0
    for shard in src:
        url = shard["url"]
        for key, group in iter_tar_groups(url, shard_counts):
            i, index = index, index + 1
            if i % world_size == rank and (i // world_size) % num_workers == worker:
                s = parse_group(url, key, group, counts)
                if s is not None:
                    yield s


def decode_images(src: Iterable[dict[str, Any]], counts: Counter[str], image_size: int, mean: np.ndarray,
                  std: np.ndarray, max_failed: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw image bytes -> normalised CHW pixels; corrupt images are counted (NoValidDataError after a long run)."""
    failed = 0
    for s in src:
        try:
            s["pixel"] = preprocess_image(s.pop("image"), image_size, mean, std)
        except Exception as e:  # PIL raises many types for corrupt data; none may stop training
            _skip(counts, "corrupt_image", f"{s['url']}:{s['key']}", repr(e))
            failed += 1
            # JSON that parses next to images that never decode would keep training busy forever.
            if max_failed is not None and failed >= max_failed:
                raise NoValidDataError(f"{failed} consecutive samples (last: {s['url']}) had undecodable images "
                                       f"(skips so far: {dict(counts)}); fix or re-convert these shards, "
                                       "or drop them from data.train_shards") from None
            continue
        failed = 0
        yield s


def worker_batches(batches: Iterable[dict[str, Any]], counts: Counter[str], batches_per_epoch: int,
                   skip: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """This worker's share of the epoch (``with_epoch`` per worker): global batches ``worker, worker + n, ...``
    below ``batches_per_epoch``; those below ``skip`` (consumed before a resume) are made and dropped."""
    for i, b in zip(range(worker, batches_per_epoch, num_workers), batches):
        if i < skip:
            counts.clear()  # already reported by the run that saved the checkpoint
            continue
        b["_index"] = i
        b["_skipped"] = dict(counts)
        counts.clear()
        yield b


def with_counts(batches: Iterable[dict[str, Any]], counts: Counter[str]) -> Iterator[dict[str, Any]]:
    """Attach the skips seen since the previous batch; a final stats-only item carries the rest."""
    for b in batches:
        b["_skipped"] = dict(counts)
        counts.clear()
        yield b
    if counts:
        yield {"_skipped": dict(counts), "_stats_only": True}


def in_global_order(batches: Iterable[dict[str, Any]], start: int) -> Iterator[dict[str, Any]]:
    """Yield batches by ``_index`` from ``start`` on: after a resume, worker w's first batch is not the
    next global one, but the DataLoader still starts its round-robin at worker 0."""
    held: dict[int, dict[str, Any]] = {}
    want = start
    for b in batches:
        held[b.pop("_index")] = b
        while want in held:
            yield held.pop(want)
            want += 1
    if held:
        raise RuntimeError(f"loader: batch {want} never arrived but {sorted(held)[:3]} did")


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
    """Per-worker webdataset pipeline of collated batches (see the module docstring for the semantics)."""

    def __init__(self, cfg: _Config):
        super().__init__()
        self.cfg = cfg
        self.epoch = 0
        self.skip_batches = 0  # global batches to drop (resume)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        counts: Counter[str] = Counter()  # this worker's skips, shared by its stages
        build = self._eval_pipeline if self.cfg.batches_per_epoch is None else self._train_pipeline
        return iter(build(wid, nw, counts))

    def _train_pipeline(self, wid: int, nw: int, counts: Counter[str]) -> wds.DataPipeline:
        c = self.cfg
        assert c.batches_per_epoch is not None
        g, total = c.rank * nw + wid, c.world_size * nw
        seed = f"{c.seed}/{self.epoch}/{g}/{total}"
        split = len(c.shards) >= total  # else every worker draws from all shards (its own seed)
        pool = len(c.shards[c.rank::c.world_size][wid::nw]) if split else len(c.shards)
        return wds.DataPipeline(
            wds.SimpleShardList(c.shards),
            *([wds.pipelinefilter(split_by_rank)(c.rank, c.world_size), wds.split_by_worker] if split else []),
            wds.pipelinefilter(resample_shards)(random.Random(f"{seed}/shards")),
            wds.pipelinefilter(train_samples)(counts, max(20, 3 * pool)),
            wds.shuffle(c.shuffle_buffer, c.shuffle_buffer, rng=random.Random(f"{seed}/shuffle")),
            wds.pipelinefilter(decode_images)(counts, c.image_size, c.mean, c.std, 1000 + 2 * c.shuffle_buffer),
            wds.batched(c.batch_size, collation_fn=collate, partial=False),
            wds.pipelinefilter(worker_batches)(counts, c.batches_per_epoch, self.skip_batches, wid, nw),
        )

    def _eval_pipeline(self, wid: int, nw: int, counts: Counter[str]) -> wds.DataPipeline:
        c = self.cfg
        return wds.DataPipeline(
            wds.SimpleShardList(c.shards),
            wds.pipelinefilter(eval_samples)(counts, c.rank, c.world_size, wid, nw),
            wds.pipelinefilter(decode_images)(counts, c.image_size, c.mean, c.std),
            wds.batched(c.batch_size, collation_fn=collate, partial=True),
            wds.pipelinefilter(with_counts)(counts),
        )


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


# Because workers ignore SIGTERM, they must never be left to multiprocessing's exit hook, which stops
# daemonic children with SIGTERM and then joins them: a worker of a loader still alive at exit (held by
# a traceback, or an iterator the trainer never finished) would make the process hang instead of exit.
_live_worker_iters: weakref.WeakSet[Any] = weakref.WeakSet()


def _stop_workers(it: Any) -> None:
    _live_worker_iters.discard(it)
    it._shutdown_workers()  # torch's own clean shutdown (index queue sentinel, then join)


@atexit.register  # registered after torch's and multiprocessing's hooks, so it runs before them
def _stop_live_workers() -> None:
    for it in list(_live_worker_iters):
        _stop_workers(it)


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
        source: Iterable[dict[str, Any]] = self._stream
        workers = None
        if self.num_workers > 0:
            workers = iter(DataLoader(self._stream, batch_size=None, num_workers=self.num_workers,
                                      collate_fn=_identity, persistent_workers=False,
                                      worker_init_fn=_ignore_stop_signals))
            _live_worker_iters.add(workers)
            source = workers
        if self.training:
            source = in_global_order(source, skip)
        try:
            for item in source:
                for reason, n in item.pop("_skipped", {}).items():
                    self._stats[reason] += n
                if item.pop("_stats_only", False):
                    continue
                self._consumed += 1
                yield item
        finally:  # finished, abandoned or failed: stop the workers now, not at garbage collection
            if workers is not None:
                _stop_workers(workers)


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
