"""Load test of `rsmoe serve` on loopback: cross-request batching on vs off, same model, same run.

    python bench/serve.py --model runs/demo/stage2
    python bench/serve.py --model runs/demo/stage2 --task ask --clients 1,4,8,16 --requests 32

Starts `rsmoe serve` twice on a free 127.0.0.1 port, one after the other: with batching
(--max-batch, --window-ms) and without (max batch 1: the baseline). Against each, N closed-loop
clients (each sends its next request when the previous one is answered) send the bundled sample
images until --requests requests are done or --duration seconds have passed, for every client
count in --clients. Prints requests/s, p50/p95 latency and the mean batch the server reported,
then the speed-up at the largest client count over one client at a time and over the unbatched
server. Every request loop is bounded in count and time, and only 127.0.0.1 is contacted.

An undertrained model never emits EOS, so each caption costs the full --max-new-tokens per expert:
the numbers are the worst case for a given length. Needs requirements-serve.txt (httpx).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["How many buildings are there?", "Is there a road?", "Is this a rural or urban area?",
             "Is the river next to the road?"]


def sample_images(n: int) -> list[bytes]:
    files = sorted((REPO / "data" / "sample").rglob("images/*.png"))
    if not files:
        raise SystemExit("no sample images under data/sample")
    step = max(1, len(files) // n)
    return [files[(i * step) % len(files)].read_bytes() for i in range(n)]


class Server:
    """`rsmoe serve` in a subprocess; its stderr is drained in a thread (and kept for errors)."""

    def __init__(self, ns: argparse.Namespace, max_batch: int):
        cmd = [sys.executable, "-m", "rsmoe.cli", "serve", "--model", ns.model, "--device", ns.device, "--dtype", ns.dtype,
               "--port", "0", "--max-batch", str(max_batch), "--batch-window-ms", str(ns.window_ms),
               "--max-new-tokens", str(ns.max_new_tokens), "--vqa-max-new-tokens", str(ns.vqa_max_new_tokens),
               "--request-timeout", str(ns.duration + 600), "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip())
                m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(600) or self.url is None:
            self.stop()
            raise SystemExit("rsmoe serve did not start:\n" + "\n".join(self.lines[-20:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def load(url: str, task: str, images: list[bytes], clients: int, requests: int, duration: float, pid: int) -> dict:
    import httpx

    issued = iter(range(requests))
    lock = threading.Lock()
    stop_at = time.monotonic() + duration
    lat: list[float] = []
    batches: list[int] = []
    errors: list[str] = []

    def client(_):
        with httpx.Client(base_url=url, timeout=duration + 600) as c:
            while time.monotonic() < stop_at:
                with lock:
                    k = next(issued, None)
                if k is None:
                    return
                files = {"image": (f"{k}.png", images[k % len(images)], "image/png")}
                data = {"question": QUESTIONS[k % len(QUESTIONS)]} if task == "ask" else {}
                t0 = time.perf_counter()
                r = c.post("/v1/caption" if task == "caption" else "/v1/ask", files=files, data=data)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                        batches.append(r.json()["timing"]["batch_size"])
                    else:
                        errors.append(f"{r.status_code} {r.text[:200]}")

    t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    ms = np.asarray(lat) * 1000
    return {"clients": clients, "requests": len(lat), "wall_s": wall, "rps": len(lat) / wall, "load_avg": os.getloadavg()[0],
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_batch": float(np.mean(batches)), "cpu_s_per_request": cpu / max(1, len(lat))}


def device_line(device: str) -> str:
    if device != "cpu":
        try:
            import torch

            if torch.cuda.is_available():
                return f"{torch.cuda.get_device_name(0)} (CUDA)"
        except ImportError:
            pass
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={threads}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run directory (uses <run>/final) or model directory")
    p.add_argument("--task", choices=["caption", "ask"], default="caption", help="endpoint to load (default caption)")
    p.add_argument("--clients", default="1,4,8", help="comma-separated concurrent client counts (default 1,4,8)")
    p.add_argument("--requests", type=int, default=16, help="requests per client count (default 16)")
    p.add_argument("--duration", type=float, default=300.0, help="at most this many seconds per client count (default 300)")
    p.add_argument("--max-batch", type=int, default=8, help="the batched server's max batch (default 8)")
    p.add_argument("--window-ms", type=float, default=20.0, help="the batched server's window (default 20)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="caption tokens per expert (default 48, the server's)")
    p.add_argument("--vqa-max-new-tokens", type=int, default=8)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ns = p.parse_args(argv)
    try:
        import httpx  # noqa: F401
    except ModuleNotFoundError:
        raise SystemExit("bench/serve.py needs httpx: pip install -r requirements-serve.txt") from None
    counts = [int(c) for c in ns.clients.split(",")]
    images = sample_images(max(counts) * 2)

    rows = []
    for mode, max_batch in (("batched", ns.max_batch), ("unbatched", 1)):
        server = Server(ns, max_batch)
        try:
            for c in counts:
                r = load(server.url, ns.task, images, c, ns.requests, ns.duration, server.proc.pid)
                rows.append({"mode": mode, "max_batch": max_batch, **r})
                print(f"  {mode} c={c}: {r['rps']:.3f} req/s", file=sys.stderr, flush=True)
        finally:
            server.stop()

    tokens = ns.max_new_tokens if ns.task == "caption" else ns.vqa_max_new_tokens
    print(f"rsmoe serve load test: {ns.model}, task {ns.task}, max_new_tokens {tokens}, window {ns.window_ms:g} ms")
    print(f"device: {device_line(ns.device)}")
    # server CPU s/req: the server process's CPU time per request, which other processes on a shared
    # machine do not inflate (wall-clock req/s they do). load avg: 1-minute load at the end of the row;
    # above the core count, other processes shared the CPU during it.
    print(f"{'mode':<10} {'max_batch':>9} {'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>9} {'p95 ms':>9} "
          f"{'mean batch':>10} {'server CPU s/req':>16} {'load avg':>8}")
    for r in rows:
        print(f"{r['mode']:<10} {r['max_batch']:>9} {r['clients']:>7} {r['requests']:>8} {r['rps']:>8.3f} "
              f"{r['p50_ms']:>9.0f} {r['p95_ms']:>9.0f} {r['mean_batch']:>10.2f} {r['cpu_s_per_request']:>16.2f} "
              f"{r['load_avg']:>8.1f}")
    top = max(counts)
    get = lambda mode, c: next(r for r in rows if r["mode"] == mode and r["clients"] == c)
    if 1 in counts:
        b1, bt, ut = get("batched", 1), get("batched", top), get("unbatched", top)
        print(f"batched, {top} clients: {bt['rps'] / b1['rps']:.2f}x the req/s of one client at a time; "
              f"{bt['rps'] / ut['rps']:.2f}x the unbatched server at {top} clients; server CPU per request "
              f"{b1['cpu_s_per_request'] / bt['cpu_s_per_request']:.2f}x lower than one client at a time")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"args": vars(ns), "device": device_line(ns.device), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
