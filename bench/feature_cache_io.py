"""Feature-cache costs per entry: disk write (with and without fsync) and verified read, memory
put/get, the pixel hash, and the start-up fingerprint; RS-MoE-1B entry sizes by default.

    python bench/feature_cache_io.py [--dir /local/disk] [--entries 64] [--fingerprint-params 100e6]

Writes into a temporary folder under --dir (default: the system's temporary directory) and removes it.
Wall and process CPU time per entry; no assertion on time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch

from rsmoe.io import feature_cache as fc


def timed(fn, n: int) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n * 1e3, (time.process_time() - c) / n * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="where the disk store goes (use the node-local disk you would cache on)")
    p.add_argument("--entries", type=int, default=64)
    p.add_argument("--fingerprint-params", type=float, default=100e6, help="parameters of the module to fingerprint")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    ns = "ab" * 32
    shapes = {"encoder (257 x 1408 bf16, ViT-g 224 px)": (257, 1408), "prefix (32 x 2048 bf16)": (32, 2048)}
    for what, shape in shapes.items():
        x = torch.randn(*shape).to(torch.bfloat16)
        mib = x.numel() * x.element_size() / 2**20
        for fsync in (True, False):
            d = tempfile.mkdtemp(dir=a.dir)
            try:
                st = fc.DiskStore(d, 2**40, fsync=fsync)
                keys = [f"{i:064x}" for i in range(a.entries)]
                w = timed(lambda i: st.put(ns, keys[i], x), a.entries)
                r = timed(lambda i: st.get(ns, keys[i]), a.entries)
            finally:
                shutil.rmtree(d)
            print(f"{what}, {mib:.3f} MiB: disk fsync={fsync}: write {w[0]:.2f} ms wall / {w[1]:.2f} ms CPU, "
                  f"verified read {r[0]:.2f} ms wall / {r[1]:.2f} ms CPU")
        mem = fc.MemoryStore(2**40)
        w = timed(lambda i: mem.put(ns, str(i), x), a.entries)
        r = timed(lambda i: mem.get(ns, str(i)), a.entries)
        print(f"{what}: memory put {w[1]:.3f} ms CPU, get {r[1]:.4f} ms CPU")
    pix = torch.randn(16, 3, 224, 224)
    _, h = timed(lambda i: fc.image_digests(pix), 5)
    print(f"pixel hash (sha256 of a 3 x 224 x 224 fp32 image): {h / 16:.2f} ms CPU per image")
    n = int(a.fingerprint_params)
    module = torch.nn.Linear(4096, max(1, n // 4096), bias=False)
    t = time.perf_counter()
    fc.fingerprint(module, "encoder")
    print(f"fingerprint of {n / 1e6:.0f}M fp32 parameters: {time.perf_counter() - t:.2f} s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
