"""`rsmoe serve` as a real process: SIGTERM finishes in-flight requests (one still uploading, one
waiting in the batch window), then the server exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import REPO, free_port
from tests.helpers.serving import CAPTION_TOKENS, IMAGES, HalfSent, data_url

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -r requirements-serve.txt")
httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -r requirements-serve.txt")


def test_sigterm_finishes_in_flight_requests_then_exits(tiny_runs):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rsmoe.cli", "serve", "--model", str(tiny_runs["stage2"]), "--device", "cpu", "--port",
         str(port), "--batch-window-ms", "1500", "--max-new-tokens", str(CAPTION_TOKENS), "--no-warmup"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        uploading = HalfSent(port, IMAGES[1])  # still uploading when SIGTERM comes
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/v1/caption", json={"image": data_url(IMAGES[0])}, timeout=60)
            time.sleep(0.5)  # that request now waits in the 1.5 s batching window
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            status, body = uploading.finish()
            r = pending.result()
        assert r.status_code == 200 and r.json()["experts"]
        assert status == 200 and b'"experts"' in body
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "listening on http://127.0.0.1:" in err and "rsmoe serve: stopped on SIGTERM" in err
        assert err.count("POST /v1/caption 200") == 2 and "batch=2" in err
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
