"""What the serving tests share: sample images, an in-thread uvicorn server, the serving config they
use, a half-sent request, and the fixtures of one loaded tiny model (import them into a test module)."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time

import pytest

from tests.helpers import REPO, free_port

UCM = os.path.join(REPO, "data", "sample", "ucm_captions", "images")
RSVQA = os.path.join(REPO, "data", "sample", "rsvqa", "hr_usgs", "images")
IMAGES = [os.path.join(UCM, "91.png"), os.path.join(UCM, "1010.png"), os.path.join(RSVQA, "0.png"), os.path.join(UCM, "108.png")]
CAPTION_TOKENS, ANSWER_TOKENS = 8, 4


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(read(path)).decode()


# Registered under the names tests use; a test module imports the *_fixture functions to have them.
@pytest.fixture(scope="module", name="run_dirs")
def run_dirs_fixture(tiny_runs):
    return tiny_runs


@pytest.fixture(scope="module", name="trained")
def trained_fixture(run_dirs):
    from rsmoe.inference.load import load_trained

    return load_trained(run_dirs["stage2"], "cpu")


@pytest.fixture(scope="module", name="engine")
def engine_fixture(trained):
    from rsmoe.serving.engine import Engine

    return Engine(trained)


class ServerThread:
    """A real uvicorn server on a free loopback port, in a thread (its own event loop)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def serve_config(**kw):
    from rsmoe.serving.app import ServeConfig
    from rsmoe.serving.engine import GenSettings

    base = dict(window_ms=30, max_batch=8, max_body_bytes=2 * 1024 * 1024, max_pixels=1_000_000,
                caption=GenSettings(CAPTION_TOKENS), answer=GenSettings(ANSWER_TOKENS))
    base.update(kw)
    return ServeConfig(**base)


def pixels(trained, path):
    from rsmoe.inference.load import read_image

    return read_image(path, trained.cfg)


class HalfSent:
    """A POST /v1/caption whose body is sent in two parts: until `finish`, it is a request still uploading."""

    def __init__(self, port: int, path: str = IMAGES[0]):
        self.body = json.dumps({"image": data_url(path)}).encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        head = (f"POST /v1/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n").encode()
        self.sock.sendall(head + self.body[:100])

    def finish(self) -> tuple[int, bytes]:
        self.sock.sendall(self.body[100:])
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        self.sock.close()
        return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]
