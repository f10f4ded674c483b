"""Frozen-feature cache (`data.feature_cache`): what the frozen visual side computed for an image, kept
in memory or in a local directory, so that later epochs skip the work.

Two kinds of entry (docs/performance.md, "Frozen-feature cache"):

- **encoder**: the vision encoder's output tokens per image (T, D). Stage I (the Q-Former trains and
  runs as usual on them) and Stage II.
- **prefix** (Stage II, the whole visual side frozen): the visual prefix (Q, H) per (image, instruction).
  A prefix miss still takes its encoder tokens from the cache: instructions are drawn per step (caption
  templates, VQA questions), so (image, instruction) pairs repeat less often than images, and the
  encoder is almost all of the frozen work (ViT-g ~0.5 TFLOP per image, the Q-Former ~3% of that).
  With `model.train_qformer_stage2`, Stage II caches encoder entries only.

**Key.** An entry's key is the sha256 (hex) of

    namespace   the frozen part, hashed once at start (`fingerprint`): KEY_VERSION, the kind, the module's
                structure (`repr`: layers, sizes, eps), every Hugging Face config inside it (heads, attention
                implementation, ...), and every tensor of its state dict (name, dtype, shape, bytes; buffers
                included). encoder: the vision encoder. prefix: the encoder's namespace + the rest of the
                visual side as loaded from the Stage I model directory (Q-Former, query tokens, projection).
    dtype, device type   the precision and the kind of device it was computed in (bf16 on GPU, fp32 on CPU)
    image       sha256 of the preprocessed pixel tensor (dtype, shape, bytes): the image, its size, resize,
                normalisation (image_mean/std) and any other preprocessing
    (prefix)    the instruction's Q-Former token ids (padding removed) and the length the batch padded them
                to. The padded length is part of the key because the Q-Former's output depends on it in the
                last bits (masked positions add exact zeros, but the kernels block differently by length):
                with it, a cached prefix is bit-for-bit what the uncached step computes on CPU.

Anything that changes the computation changes one of these, so a stale entry is never found; entries
of another model are just never looked up (disk: they live under another namespace directory). Stage I
and Stage II share encoder entries (the same frozen encoder): a Stage II run pointed at Stage I's
directory starts with every image's encoder tokens.

**Stores.** `MemoryStore`: per process, host memory, no eviction: when `max_bytes` is reached new entries
are not stored (counted as `full`; with uniform sampling a full cache keeps a fixed share of hits, where
LRU would thrash). `DiskStore`: `<dir>/<namespace[:16]>/<key[:2]>/<key>.fc`, one file per entry, shared by
every rank and run that points at it. A write goes to a temporary name in the same directory and is
renamed into place once whole, so a reader never sees half an entry, and a run killed mid-write leaves
only a temporary file (never read; swept after an hour). Every read checks the magic, the key, the length
and a crc32 of the payload; a bad entry (a disk error, or a power cut after the rename but before the data
reached the disk: entries are not fsync'd, see `DiskStore`) is deleted, counted as `corrupt` and recomputed. Two writers of one entry
write identical bytes and the last rename wins. `max_bytes` bounds the whole directory (every
namespace): measured at start and every `RESCAN_EVERY` writes, plus this process's own writes, so
concurrent writers overshoot by at most RESCAN_EVERY entries each.

Loader workers never touch the cache: it runs in the training process, on the model's inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from rsmoe.config import ConfigError
from rsmoe.distributed import collectives

log = logging.getLogger(__name__)

KEY_VERSION = 1
MAGIC = b"RSMOEFC1"
SUFFIX = ".fc"
RESCAN_EVERY = 256  # disk writes between re-measuring the directory (other writers' entries)
STALE_TMP_S = 3600  # temporary files older than this are a killed writer's leftovers
LOG_EVERY_S = 600.0


# ---------------------------------------------------------------- keys


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, bf16 included), on the CPU."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def fingerprint(module: torch.nn.Module, kind: str, skip: str | None = None) -> str:
    """The namespace of `module`'s entries: structure, configs and every tensor (see the module docstring);
    `skip`: leave out the submodule of that name (hashed separately)."""
    tensors = [(n, t) for n, t in module.state_dict().items() if skip is None or not n.startswith(skip + ".")]
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        raise RuntimeError("fingerprint the frozen module before DeepSpeed partitions it (its weights are placeholders)")
    h = hashlib.sha256(f"rsmoe-feature-cache/{KEY_VERSION}/{kind}\n".encode())
    h.update(repr(module).encode())
    for name, sub in module.named_modules():
        if skip is not None and (name == skip or name.startswith(skip + ".")):
            continue
        cfg = getattr(sub, "config", None)
        if hasattr(cfg, "to_json_string"):
            h.update(f"\n{name}:{getattr(cfg, '_attn_implementation', None)}:".encode())
            h.update(cfg.to_json_string(use_diff=False).encode())

    def one(item: tuple[str, torch.Tensor]) -> bytes:  # hashlib releases the GIL: tensors hash in parallel
        name, t = item
        d = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        d.update(tensor_bytes(t))
        return d.digest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # shut down before any fork
        for digest in pool.map(one, tensors):
            h.update(digest)
    return h.hexdigest()


def image_digests(pixel_values: torch.Tensor) -> list[bytes]:
    """sha256 of each preprocessed image (dtype, shape, bytes): ~0.4 ms per 224 px image on one core."""
    x = pixel_values.detach().to("cpu").contiguous()
    head = f"{x.dtype}|{tuple(x.shape[1:])}|".encode()
    out = []
    for i in range(x.shape[0]):
        h = hashlib.sha256(head)
        h.update(tensor_bytes(x[i]))
        out.append(h.digest())
    return out


def entry_key(namespace: str, dtype: torch.dtype, device: torch.device, image: bytes, *extra: bytes) -> str:
    h = hashlib.sha256(f"{namespace}|{dtype}|{device.type}|".encode())
    h.update(image)
    for e in extra:  # length-prefixed: no two different lists of parts hash the same bytes
        h.update(f"|{len(e)}:".encode())
        h.update(e)
    return h.hexdigest()


# ---------------------------------------------------------------- stores


@dataclass
class StoreStats:
    stored: int = 0
    """entries this process added"""
    corrupt: int = 0
    """entries that failed verification on read (deleted, recomputed)"""
    full: int = 0
    """entries not stored because the size limit was reached"""


class MemoryStore:
    """Entries in this process's host memory (CPU tensors), up to `max_bytes`; no eviction."""

    kind = "memory"

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.stats = StoreStats()
        self._entries: dict[str, torch.Tensor] = {}
        self.by_namespace: dict[str, tuple[int, int]] = {}  # namespace -> (entries, bytes)
        self._warned_full = False

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, namespace: str, key: str) -> torch.Tensor | None:
        return self._entries.get(key)  # keys already hash their namespace

    def put(self, namespace: str, key: str, value: torch.Tensor) -> bool:
        if key in self._entries:
            return True
        size = value.numel() * value.element_size()
        if self.nbytes + size > self.max_bytes:
            self.stats.full += 1
            if not self._warned_full:
                self._warned_full = True
                log.warning("feature cache (memory) is full at %.2f GiB (data.feature_cache_gb): later entries "
                            "are not stored, so only the cached share of samples skips the frozen work", self.nbytes / 2**30)
            return False
        self._entries[key] = value.detach().to("cpu").clone()  # clone: never keep a whole batch alive
        self.nbytes += size
        n, b = self.by_namespace.get(namespace, (0, 0))
        self.by_namespace[namespace] = (n + 1, b + size)
        self.stats.stored += 1
        return True


class DiskStore:
    """One verified file per entry under `<root>/<namespace[:16]>/`, safe for many concurrent processes."""

    kind = "disk"

    def __init__(self, root: str | Path, max_bytes: int, namespaces: tuple[str, ...] = (), fsync: bool = False):
        """`namespaces`: this run's (to tell its entries from others' in the start-up log line). `fsync`:
        flush each entry to the disk before its rename. Off by default: it protects against losing entries
        in a power cut, not against reading a bad one (a crash can leave a renamed file with missing data,
        which the read-time checksum rejects), and it costs ~3 ms per entry (bench/feature_cache_io.py)."""
        self.root = Path(root)
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.stats = StoreStats()
        self._writes_since_scan = 0
        self._warned = {"full": False, "corrupt": False}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"config key 'data.feature_cache': cannot create the cache directory {self.root} ({exc}); "
                              "point it at a writable local directory, or use 'memory' or 'off'") from None
        self.nbytes, mine = self._scan(sweep=True, namespaces=namespaces)
        if self.nbytes - mine > 0:
            log.info("feature cache %s: %.2f GiB of entries in other namespace directories (other models or "
                     "checkpoints); they count towards data.feature_cache_gb: delete them when no run needs them",
                     self.root, (self.nbytes - mine) / 2**30)

    def _scan(self, sweep: bool = False, namespaces: tuple[str, ...] = ()) -> tuple[int, int]:
        """(bytes of every entry under the root, bytes under `namespaces`); with `sweep`, drop stale temporary files."""
        total, mine, now = 0, 0, time.time()
        own = {ns[:16] for ns in namespaces}
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except FileNotFoundError:  # renamed or swept meanwhile
                    continue
                if name.endswith(".tmp"):
                    if sweep and now - st.st_mtime > STALE_TMP_S:
                        with _suppress_missing():
                            os.unlink(p)
                        continue
                elif not name.endswith(SUFFIX):
                    continue
                total += st.st_size
                if Path(p).relative_to(self.root).parts[0] in own:
                    mine += st.st_size
        return total, mine

    def path(self, namespace: str, key: str) -> Path:
        return self.root / namespace[:16] / key[:2] / f"{key}{SUFFIX}"

    def get(self, namespace: str, key: str) -> torch.Tensor | None:
        p = self.path(namespace, key)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        value = _decode(data, key)
        if value is None:
            self.stats.corrupt += 1
            if not self._warned["corrupt"]:
                self._warned["corrupt"] = True
                log.warning("feature cache: %s failed verification (truncated or corrupt); deleted and recomputed "
                            "(further ones are only counted: feature_cache/corrupt)", p)
            with _suppress_missing():
                p.unlink()
        return value

    def put(self, namespace: str, key: str, value: torch.Tensor) -> bool:
        p = self.path(namespace, key)
        if p.exists():  # another rank or run wrote it: identical bytes
            return True
        data = _encode(key, value)
        if self.nbytes + len(data) > self.max_bytes:
            self.stats.full += 1
            if not self._warned["full"]:
                self._warned["full"] = True
                log.warning("feature cache %s is full (%.2f GiB, data.feature_cache_gb): later entries are not stored",
                            self.root, self.nbytes / 2**30)
            return False
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
        self.nbytes += len(data)
        self.stats.stored += 1
        self._writes_since_scan += 1
        if self._writes_since_scan >= RESCAN_EVERY:
            self._writes_since_scan = 0
            self.nbytes = self._scan()[0]
        return True


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, tp, exc, tb) -> bool:
        return tp is not None and issubclass(tp, FileNotFoundError)


def _encode(key: str, value: torch.Tensor) -> bytes:
    """MAGIC | u32 header length | header JSON (key, dtype, shape, nbytes, crc32) | payload."""
    payload = bytes(tensor_bytes(value))
    header = json.dumps({"key": key, "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                         "nbytes": len(payload), "crc32": zlib.crc32(payload)}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + payload


def _decode(data: bytes, key: str) -> torch.Tensor | None:
    """The tensor of an entry file, or None if anything about it is wrong."""
    try:
        if data[:8] != MAGIC:
            return None
        (n,) = struct.unpack("<I", data[8:12])
        header = json.loads(data[12 : 12 + n])
        payload = data[12 + n :]
        if header["key"] != key or len(payload) != header["nbytes"] or zlib.crc32(payload) != header["crc32"]:
            return None
        dtype = getattr(torch, header["dtype"])
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(header["shape"])
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None


Store = MemoryStore | DiskStore


def open_store(spec: str, max_gb: float, namespaces: tuple[str, ...] = ()) -> Store:
    """'memory' or a directory (`~` and `$VARS` expanded: `$SLURM_TMPDIR/rsmoe-cache` is node-local)."""
    max_bytes = int(max_gb * 2**30)
    if spec == "memory":
        return MemoryStore(max_bytes)
    return DiskStore(os.path.expandvars(os.path.expanduser(spec)), max_bytes, namespaces)


# ---------------------------------------------------------------- the model-side wrapper


@dataclass
class CacheCounts:
    hits: int = 0
    """rows taken from the cache (or from another row of the same batch with the same key)"""
    misses: int = 0
    """entries computed"""


class FeatureCache:
    """`RSMoE.prefix_fn` that takes the frozen visual work of a batch from `store` where it was done before.

    `prefix_ns` None (Stage I, or a trainable Q-Former): encoder tokens per image from the cache, then the
    Q-Former as usual. Otherwise (Stage II): prefixes per (image, instruction); the misses are computed
    together, in one call, which takes its encoder tokens from the cache too. Every computed entry is stored.

    With expert parallelism (`stack_inner`, called by `ExpertParallel.attach`) the prefix misses go through
    the sliced visual prefix, and the EP group first agrees on them (one all-reduce of P flags): a prefix is
    taken from the cache only if every rank of the group has it, so every rank makes the same sliced call.
    Inside its slice each rank looks up encoder entries on its own (no collective depends on those).
    """

    def __init__(self, store: Store, encoder_ns: str, prefix_ns: str | None):
        self.store, self.encoder_ns, self.prefix_ns = store, encoder_ns, prefix_ns
        self.inner: Callable[..., torch.Tensor] | None = None
        self.group = None
        self.encoder = CacheCounts()
        self.prefix = CacheCounts()
        self._checked = False
        self._last_log = time.monotonic()

    def stack_inner(self, inner: Callable[..., torch.Tensor], group) -> None:
        if self.prefix_ns is None:
            raise ConfigError("data.feature_cache with expert parallelism caches the frozen visual prefix; "
                              "it cannot be combined with model.train_qformer_stage2")
        self.inner, self.group = inner, group

    def stats(self) -> dict[str, float]:
        s = {}
        for kind, counts in (("encoder", self.encoder), ("prefix", self.prefix)):
            s.update({f"{kind}_{f.name}": float(getattr(counts, f.name)) for f in fields(counts)})
        s.update({f.name: float(getattr(self.store.stats, f.name)) for f in fields(self.store.stats)})
        return s

    # ------------------------------------------------------------ compute
    def __call__(self, visual, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor,
                 qformer_attention_mask: torch.Tensor, prefix_image: torch.Tensor | None = None) -> torch.Tensor:
        if not self._checked:
            self._check_partitioning(visual)
        if self.prefix_ns is None:
            out = visual.from_image_embeds(self.encoder_tokens(visual, pixel_values), qformer_input_ids,
                                           qformer_attention_mask, prefix_image)
        else:
            out = self._prefixes(visual, pixel_values, qformer_input_ids, qformer_attention_mask, prefix_image)
        if time.monotonic() - self._last_log > LOG_EVERY_S:
            self._last_log = time.monotonic()
            s = self.stats()
            log.info("feature cache (%s): encoder %d hits / %d misses, prefix %d / %d, %d stored (%.2f GiB), %d corrupt, "
                     "%d not stored (full)", self.store.kind, s["encoder_hits"], s["encoder_misses"], s["prefix_hits"],
                     s["prefix_misses"], s["stored"], self.store.nbytes / 2**30, s["corrupt"], s["full"])
        return out

    def _lookup(self, ns: str, keys: list[str]) -> list[torch.Tensor | None]:
        return [self.store.get(ns, k) for k in keys]

    def _store(self, ns: str, keys: list[str], values: torch.Tensor | None) -> None:
        """Store `values[j]` under `keys[j]`."""
        if keys:
            host = values.detach().to("cpu")  # one device-to-host copy for the batch
            for j, k in enumerate(keys):
                self.store.put(ns, k, host[j])

    def encoder_tokens(self, visual, pixel_values: torch.Tensor) -> torch.Tensor:
        """`visual.encode(pixel_values)`, with each image's tokens from the cache where they are."""
        dev = pixel_values.device
        dtype = visual.proj.weight.dtype
        keys = [entry_key(self.encoder_ns, dtype, dev, d) for d in image_digests(pixel_values)]
        found = self._lookup(self.encoder_ns, keys)
        compute, source = _plan(keys, [f is None for f in found])
        self.encoder.misses += len(compute)
        self.encoder.hits += len(keys) - len(compute)
        computed = visual.encode(pixel_values[torch.tensor(compute, device=dev)]) if compute else None
        self._store(self.encoder_ns, [keys[i] for i in compute], computed)
        return _assemble(found, source, computed, dev)

    def _prefixes(self, visual, pixel_values, ids, mask, prefix_image):
        dev, p = ids.device, ids.shape[0]
        image_of = torch.arange(p) if prefix_image is None else prefix_image.detach().cpu()
        digests = image_digests(pixel_values)
        ids_h, mask_h = ids.detach().cpu(), mask.detach().cpu().bool()
        padded = str(ids.shape[1]).encode()
        dtype = visual.proj.weight.dtype
        keys = [entry_key(self.prefix_ns, dtype, dev, digests[int(image_of[i])], ids_h[i][mask_h[i]].numpy().tobytes(), padded)
                for i in range(p)]
        found = self._lookup(self.prefix_ns, keys)
        own_miss = torch.tensor([f is None for f in found], dtype=torch.float32)
        agreed = own_miss if self.group is None else collectives.all_max(own_miss, self.group)
        compute, source = _plan(keys, agreed.bool().tolist())
        self.prefix.misses += len(compute)
        self.prefix.hits += p - len(compute)
        computed = None
        if compute:
            sel = torch.tensor(compute)
            needed, image_index = torch.unique(image_of[sel], return_inverse=True)
            args = (pixel_values[needed.to(pixel_values.device)], ids[sel.to(dev)], mask[sel.to(dev)], image_index.to(dev))
            with_tokens = _EncoderCached(self, visual)
            computed = self.inner(with_tokens, *args) if self.inner is not None else with_tokens(*args)
        # Store only what this rank lacked (with EP, a prefix another rank lacked is recomputed, not re-stored).
        lacked = [j for j, i in enumerate(compute) if own_miss[i]]
        self._store(self.prefix_ns, [keys[compute[j]] for j in lacked], computed[lacked] if lacked else None)
        return _assemble(found, source, computed, dev)

    def _check_partitioning(self, visual) -> None:
        """A rank whose batch hits skips the cached module's forward. Under ZeRO-3 with that module
        partitioned (not resident), its forward all-gathers weights, so the other ranks would wait forever."""
        self._checked = True
        module = visual.vision if self.prefix_ns is None else visual
        partitioned = [n for n, q in module.named_parameters() if hasattr(q, "ds_id") and not getattr(q, "ds_persist", False)]
        if partitioned and collectives.active():
            raise ConfigError(
                f"data.feature_cache skips the frozen visual forward on ranks whose batch is cached, but ZeRO-3 "
                f"partitions {len(partitioned)} of its weights here (e.g. {partitioned[0]}: they do not fit the resident "
                "budget), and their all-gather would leave the other ranks waiting. Use ZeRO-2 "
                "(ds_configs/zero2.json) or data.feature_cache=off"
            )


class _EncoderCached:
    """Stands in for the VisualPrefix in the prefix misses' call (also inside the expert-parallel slice):
    the same forward, with the encoder tokens from the cache."""

    def __init__(self, cache: FeatureCache, visual):
        self.cache, self.visual = cache, visual

    def __call__(self, pixel_values, input_ids, attention_mask, image_index=None) -> torch.Tensor:
        tokens = self.cache.encoder_tokens(self.visual, pixel_values)
        return self.visual.from_image_embeds(tokens, input_ids, attention_mask, image_index)


def _plan(keys: list[str], missing: list[bool]) -> tuple[list[int], list[int]]:
    """(rows to compute: the first row of each missing key, once; for every row its index in those, -1 = cached)."""
    first: dict[str, int] = {}
    compute, source = [], []
    for i, (k, m) in enumerate(zip(keys, missing)):
        if not m:
            source.append(-1)
            continue
        if k not in first:
            first[k] = len(compute)
            compute.append(i)
        source.append(first[k])
    return compute, source


def _assemble(found: list[torch.Tensor | None], source: list[int], computed: torch.Tensor | None,
              device: torch.device) -> torch.Tensor:
    """The batch in order: row i is `computed[source[i]]`, or the cached `found[i]` where source[i] < 0."""
    n = len(source)
    if computed is not None and source == list(range(n)):
        return computed  # nothing cached: exactly the uncached computation
    cached = [i for i, j in enumerate(source) if j < 0]
    fresh = [i for i, j in enumerate(source) if j >= 0]
    like = computed[0] if computed is not None else found[cached[0]]
    out = torch.empty((n, *like.shape), dtype=like.dtype, device=device)
    if cached:
        out[torch.tensor(cached, device=device)] = torch.stack([found[i] for i in cached]).to(device, like.dtype)
    if fresh:
        out[torch.tensor(fresh, device=device)] = computed[torch.tensor([source[i] for i in fresh], device=device)]
    return out


# ---------------------------------------------------------------- wiring helpers


def attach_feature_cache(model, spec: str, max_gb: float) -> FeatureCache | None:
    """Install a FeatureCache as `model.prefix_fn` (after Stage II's weights are loaded; before DeepSpeed)."""
    if spec in ("", "off"):
        return None
    if model.prefix_fn is not None:
        raise RuntimeError("attach the feature cache before any other prefix_fn (expert parallelism stacks on it)")
    t0 = time.perf_counter()
    visual = model.visual
    encoder_ns = fingerprint(visual.vision, "encoder")
    prefix_ns = None
    if not visual.trainable():
        rest = fingerprint(visual, "prefix", skip="vision")
        prefix_ns = hashlib.sha256(f"{encoder_ns}|{rest}".encode()).hexdigest()
    namespaces = (encoder_ns,) + ((prefix_ns,) if prefix_ns else ())
    store = open_store(spec, max_gb, namespaces)
    cache = FeatureCache(store, encoder_ns, prefix_ns)
    model.prefix_fn = cache
    where = "host memory" if store.kind == "memory" else str(store.root)
    log.info("feature cache: %s entries in %s (limit %.1f GiB), namespaces %s (fingerprint of %s parameters, %.1f s)",
             "encoder + prefix" if prefix_ns else "encoder", where, max_gb, "/".join(ns[:16] for ns in namespaces),
             f"{sum(q.numel() for q in visual.parameters()):,}", time.perf_counter() - t0)
    return cache


def feature_cache_of(model) -> FeatureCache | None:
    fn = getattr(model, "prefix_fn", None)
    return fn if isinstance(fn, FeatureCache) else None


def feature_cache_metrics(model, group=None) -> dict[str, float]:
    """{'feature_cache/encoder_hits', ...} summed over `group` (the ranks reading distinct data),
    'feature_cache/gib' the largest store. Collective when a cache is attached (every rank has one or
    none: same config)."""
    cache = feature_cache_of(model)
    if cache is None:
        return {}
    stats = cache.stats()
    keys = sorted(stats)
    summed = collectives.all_sum(torch.tensor([stats[k] for k in keys], dtype=torch.float64), group).tolist()
    out = {f"feature_cache/{k}": v for k, v in zip(keys, summed)}
    gib = collectives.all_max(torch.tensor([cache.store.nbytes / 2**30], dtype=torch.float64), group)
    out["feature_cache/gib"] = float(gib.item())
    return out
