"""Data throughput: images/s for decode + preprocess + collate at 224 px from real PNGs.

Rows:
  * ``raw``       - in-memory PNG bytes of the bundled sample -> preprocess_image -> collate (1 process)
  * ``stream-wN`` - the full streaming pipeline (tar reading, shuffle buffer, decode, collate) over
                    the sample shards in training mode with N DataLoader workers; per-worker rate = total / N
Builds the sample shards in a temporary folder (nothing is written elsewhere) and prints a table.

    python bench/data_throughput.py [--batches 20] [--batch-size 16] [--workers 0 1 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from rsmoe.data.loader import build_loader, collate, preprocess_image
from rsmoe.data.sample import build_sample_shards, sample_root

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def bench_raw(size: int, batch_size: int, n_images: int) -> float:
    files = sorted(sample_root().rglob("images/*.png"))
    blobs = [f.read_bytes() for f in files]
    mean, std = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)
    for b in blobs[:4]:  # warm-up (lazy imports, allocator)
        preprocess_image(b, size, mean, std)
    t0 = time.perf_counter()
    done = 0
    while done < n_images:
        batch = []
        for i in range(batch_size):
            b = blobs[(done + i) % len(blobs)]
            batch.append({"key": str(i), "pixel": preprocess_image(b, size, mean, std),
                          "record": {"caption": "c", "parts": {}, "qa": [], "dataset": "d"}})
        collate(batch)
        done += batch_size
    return done / (time.perf_counter() - t0)


def bench_stream(shards: str, size: int, batch_size: int, batches: int, workers: int) -> float:
    ld = build_loader(shards, batch_size=batch_size, image_size=size, image_mean=MEAN, image_std=STD,
                      num_workers=workers, batches_per_epoch=batches, shuffle_buffer=64)
    t0 = time.perf_counter()
    n = sum(len(b["key"]) for b in ld)  # includes worker start-up, as a training epoch does
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    n_images = a.batches * a.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        build_sample_shards(Path(tmp) / "sample")
        shards = str(Path(tmp) / "sample" / "train-*.tar")
        rows = [("raw (no streaming)", 1, bench_raw(a.size, a.batch_size, n_images))]
        for w in a.workers:
            rows.append((f"stream, num_workers={w}", max(w, 1), bench_stream(shards, a.size, a.batch_size, a.batches, w)))
    print(f"{'pipeline':<26}{'procs':>6}{'img/s total':>13}{'img/s/worker':>14}   ({a.size}px, batch {a.batch_size}, {n_images} images)")
    for name, procs, rate in rows:
        print(f"{name:<26}{procs:>6}{rate:>13.1f}{rate / procs:>14.1f}")


if __name__ == "__main__":
    main()
