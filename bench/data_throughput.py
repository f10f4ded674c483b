"""Data throughput: images/s of the streaming loader against the previous hand-written one, same run.

Rows:
  * ``raw``           - in-memory PNG bytes of the bundled sample -> preprocess_image -> collate (1 process)
  * ``webdataset``    - rsmoe.data.loader as it is now (webdataset stages + rsmoe's own stages)
  * ``hand-written``  - rsmoe/data/loader.py at ``--baseline-rev`` (default f643783, the last hand-written
                        tar streamer), loaded from git history into a temporary module
Both loaders run the full training-mode pipeline (tar reading, shuffle buffer, decode, collate) over the
same shards with the same settings, for each ``--workers`` value; the implementations alternate within
each repeat and the table shows the median images/s over ``--repeats`` (worker start-up included, as in
a training epoch). Builds the bundled sample shards in a temporary folder unless ``--shards`` is given.

    python bench/data_throughput.py [--batches 20] [--batch-size 16] [--workers 0 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from git_baseline import module_at  # bench/git_baseline.py (this script's folder is on sys.path)
from rsmoe.data import loader as current
from rsmoe.data.sample import build_sample_shards, sample_root

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
REPO = Path(__file__).resolve().parents[1]


def bench_raw(size: int, batch_size: int, n_images: int) -> float:
    files = sorted(sample_root().rglob("images/*.png"))
    blobs = [f.read_bytes() for f in files]
    mean, std = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)
    for b in blobs[:4]:  # warm-up (lazy imports, allocator)
        current.preprocess_image(b, size, mean, std)
    t0 = time.perf_counter()
    done = 0
    while done < n_images:
        batch = []
        for i in range(batch_size):
            b = blobs[(done + i) % len(blobs)]
            batch.append({"key": str(i), "pixel": current.preprocess_image(b, size, mean, std),
                          "record": {"caption": "c", "parts": {}, "qa": [], "dataset": "d"}})
        current.collate(batch)
        done += batch_size
    return done / (time.perf_counter() - t0)


def bench_stream(impl: ModuleType, shards: str, size: int, batch_size: int, batches: int, workers: int,
                 seed: int) -> float:
    ld = impl.build_loader(shards, batch_size=batch_size, image_size=size, image_mean=MEAN, image_std=STD,
                           num_workers=workers, batches_per_epoch=batches, shuffle_buffer=64, seed=seed)
    t0 = time.perf_counter()
    n = sum(len(b["key"]) for b in ld)  # includes worker start-up, as a training epoch does
    assert n == batches * batch_size, n
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224, help="image size (px)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=20, help="batches per measured epoch")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to measure")
    p.add_argument("--repeats", type=int, default=5, help="repeats per (implementation, workers); median shown")
    p.add_argument("--baseline-rev", default="f643783", help="git revision of the hand-written loader")
    p.add_argument("--shards", help="shard pattern to read (default: the bundled sample, built in a temp dir)")
    a = p.parse_args()
    n_images = a.batches * a.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        baseline = module_at(a.baseline_rev, "rsmoe/data/loader.py", "data_throughput")
        if a.shards:
            shards = a.shards
        else:
            build_sample_shards(Path(tmp) / "sample")
            shards = str(Path(tmp) / "sample" / "train-*.tar")
        impls = {"webdataset": current, f"hand-written ({a.baseline_rev})": baseline}
        runs: dict[tuple[str, int], list[float]] = {(name, w): [] for w in a.workers for name in impls}
        for r in range(a.repeats):
            for w in a.workers:
                order = list(impls.items()) if r % 2 == 0 else list(impls.items())[::-1]
                for name, impl in order:  # alternate who goes first: drift of a shared machine hits both
                    runs[name, w].append(bench_stream(impl, shards, a.size, a.batch_size, a.batches, w, seed=r))
            print(f"repeat {r + 1}/{a.repeats} done", file=sys.stderr)
        raw = bench_raw(a.size, a.batch_size, n_images)
    print(f"{a.size}px, batch {a.batch_size}, {a.batches} batches = {n_images} images per run, "
          f"median of {a.repeats} runs (min-max)")
    print(f"{'implementation':<26}{'workers':>8}{'images/s':>10}{'min-max':>16}{'vs baseline':>13}")
    print(f"{'raw decode (no streaming)':<26}{'-':>8}{raw:>10.1f}")
    base_name = list(impls)[1]
    for w in a.workers:
        base = statistics.median(runs[base_name, w])
        for name in impls:
            v = runs[name, w]
            med = statistics.median(v)
            print(f"{name:<26}{w:>8}{med:>10.1f}{f'{min(v):.1f}-{max(v):.1f}':>16}{med / base:>12.2f}x")


if __name__ == "__main__":
    main()
