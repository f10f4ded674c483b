"""Serve a trained model over HTTP: an API (caption, ask, OpenAI-compatible chat) and a web page.

    rsmoe serve --model runs/demo/stage2                 # http://127.0.0.1:8000/
    rsmoe serve --model runs/demo/stage2 --max-batch 16 --batch-window-ms 10

Needs the serve extra: pip install -e .[serve] (or pip install -r requirements-serve.txt).
Requests that arrive within --batch-window-ms of each other are generated together (up to
--max-batch requests per call; --max-batch 1 turns batching off). One line is logged per request:
method, path, status, latency, batch size. SIGTERM (or Ctrl-C) finishes in-flight requests, then
exits. Binds to 127.0.0.1 unless --host says otherwise. Endpoints: docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys

import numpy as np

from rsmoe.cli.common import add_model_arguments
from rsmoe.errors import UserError
from rsmoe.inference.load import load_trained
from rsmoe.serving.engine import AnswerJob, CaptionJob, Engine, GenSettings
from rsmoe.serving.images import DEFAULT_MAX_PIXELS

log = logging.getLogger("rsmoe.serving")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed at start)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=8, help="requests per generate call (default 8; 1 = no batching)")
    g.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="once the model is free, how long it waits for more requests to join a batch (default 20; "
                        "CPU: 100 keeps bursts together at ~1%% of a generation)")
    g.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 503 (default 256)")
    g = p.add_argument_group("limits")
    g.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds a request may wait for the model before a 504 (default 120)")
    g.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MiB (default 20)")
    g.add_argument("--max-pixels", type=int, default=None, help="largest image in pixels, checked before decoding (default 40,000,000)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=48, help="caption length limit per expert (default 48)")
    g.add_argument("--vqa-max-new-tokens", type=int, default=8, help="answer length limit (default 8)")
    g.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default); >1 = beam search")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0 = off)")
    p.add_argument("--no-warmup", action="store_true", help="skip the one warm-up generation before accepting requests")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"], help="default info (one line per request)")


def serve_config(ns: argparse.Namespace):
    from rsmoe.serving.app import (
        ServeConfig,  # the serve extra (FastAPI): only when serving
    )
    checks = [(ns.max_batch >= 1, "--max-batch must be >= 1"), (ns.batch_window_ms >= 0, "--batch-window-ms must be >= 0"),
              (ns.max_queue >= 1, "--max-queue must be >= 1"), (ns.request_timeout > 0, "--request-timeout must be > 0"),
              (ns.max_body_mb > 0, "--max-body-mb must be > 0"), (ns.max_pixels is None or ns.max_pixels > 0, "--max-pixels must be > 0"),
              (ns.max_new_tokens >= 1 and ns.vqa_max_new_tokens >= 1, "--max-new-tokens and --vqa-max-new-tokens must be >= 1"),
              (ns.num_beams >= 1, "--num-beams must be >= 1"), (ns.repetition_penalty > 0, "--repetition-penalty must be > 0"),
              (0 <= ns.port <= 65535, "--port must be 0..65535")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    return ServeConfig(
        window_ms=ns.batch_window_ms, max_batch=ns.max_batch, max_queue=ns.max_queue, request_timeout_s=ns.request_timeout,
        max_body_bytes=int(ns.max_body_mb * 1024 * 1024), max_pixels=ns.max_pixels or DEFAULT_MAX_PIXELS,
        caption=GenSettings(ns.max_new_tokens, ns.num_beams, ns.repetition_penalty),
        answer=GenSettings(ns.vqa_max_new_tokens, ns.num_beams, ns.repetition_penalty),
    )


def bind(host: str, port: int) -> socket.socket:
    """Bind before loading anything slow, so a taken port fails in a second with one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def warm_up(app) -> None:
    """One caption and one answer through the worker, so the first user does not pay for lazy init."""
    eng, cfg, batcher = app.state.engine, app.state.config, app.state.batcher
    px = np.zeros((3, eng.image_size, eng.image_size), np.float32)
    batcher.submit(("caption", cfg.caption), CaptionJob(px)).result()
    batcher.submit(("answer", cfg.answer), AnswerJob(px, "Is there a road?")).result()


def run(ns: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rsmoe.serving").setLevel(ns.log_level.upper())
    for noisy in ("transformers", "DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import uvicorn

        from rsmoe.serving.app import create_app
    except ModuleNotFoundError as exc:
        raise UserError(f"the serve extra is not installed ({exc.name} missing): pip install -e .[serve]") from None
    cfg = serve_config(ns)
    sock = bind(ns.host, ns.port)
    try:
        trained = load_trained(ns.model, ns.device, ns.dtype)
    except BaseException:
        sock.close()
        raise

    app = create_app(Engine(trained), cfg)
    if not ns.no_warmup:
        warm_up(app)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"rsmoe serve: {trained.model_dir} (stage {trained.stage}, experts {', '.join(trained.experts)}) on "
          f"{trained.device}, batching max {cfg.max_batch} / window {cfg.window_ms:g} ms, listening on "
          f"http://{shown}:{port}/", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_config=None, access_log=False, log_level=ns.log_level,
                            timeout_graceful_shutdown=int(cfg.request_timeout_s) + 5)
    server = uvicorn.Server(config)
    # Uvicorn handles SIGTERM/SIGINT itself (stop accepting, finish in-flight requests, run the
    # shutdown that stops the batcher) and then re-raises the signal to the handler it replaced.
    # That handler is this one: it notes the signal, so the process ends with "stopped" and exit 0.
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda sig, frame: caught.append(sig)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    why = f" on {signal.Signals(caught[0]).name}" if caught else ""
    print(f"rsmoe serve: stopped{why}", file=sys.stderr, flush=True)
    return 0
