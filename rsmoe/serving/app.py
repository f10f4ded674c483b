"""The HTTP surface: FastAPI routes over an Engine behind a Batcher, plus the web page.

    app = create_app(Engine(load_trained("runs/demo/stage2")), ServeConfig())

Routes: POST /v1/caption, POST /v1/ask, POST /v1/chat/completions (OpenAI-compatible),
GET /v1/models, GET /health, GET / (the web page, rsmoe/serving/static/). Every error is one JSON
object in the OpenAI shape, {"error": {"message", "type", "param", "code"}}, with a 4xx status for
bad input and 503/504 when the server is full or too slow. Requests never name files: images come
in the body (multipart upload, base64 JSON, or a data: URL).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from rsmoe.serving.batcher import Batcher, Closed, Done, QueueFull
from rsmoe.serving.chat import completion, parse_chat, stream_events
from rsmoe.serving.engine import (
    COMPOSED_MODEL,
    AnswerJob,
    CaptionJob,
    Engine,
    GenSettings,
)
from rsmoe.serving.images import (
    DEFAULT_MAX_PIXELS,
    InputError,
    decode_base64,
    load_pixels,
)

log = logging.getLogger("rsmoe.serving")
STATIC = Path(__file__).resolve().parent / "static"
DRAIN_BYTES = 64 * 1024 * 1024  # how much of an oversized body is read and dropped before the 413
MAX_TEXT_CHARS = 2000  # instructions and questions; the model reads at most a few dozen tokens anyway


@dataclass
class ServeConfig:
    window_ms: float = 20.0
    """Once the worker is free and has a request, how long it waits for more to join the batch."""
    max_batch: int = 8
    """Requests per generate call (rows = requests x experts for captions); 1 = batching off."""
    max_queue: int = 256
    """Requests waiting beyond this get 503 at once instead of a long wait."""
    request_timeout_s: float = 120.0
    """A request still waiting for the model after this long gets 504."""
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    caption: GenSettings = field(default_factory=lambda: GenSettings(max_new_tokens=48))
    answer: GenSettings = field(default_factory=lambda: GenSettings(max_new_tokens=8))


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
            503: "overloaded", 504: "timeout"}.get(status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class RequestGuard:
    """ASGI middleware: body-size limit (checked before the app reads a byte) and one log line per request.

    The body is read here and replayed to the app, so a chunked body (no Content-Length) is held to
    the same limit; a client that sent `Expect: 100-continue` (curl does for large bodies) is refused
    before it uploads anything."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}
        scope.setdefault("state", {})

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers", []))
            declared = _int(headers.get(b"content-length"))
            if declared is not None and declared > self.max_body and headers.get(b"expect", b"").lower() == b"100-continue":
                body = None  # the client waits for our go-ahead: refuse before it sends a byte
            else:
                body = await self._read_body(receive)
            if body is None:
                resp = _error(413, f"the request body is over the limit of {self.max_body:,} bytes: send a smaller image")
                resp.headers["connection"] = "close"
                await resp(scope, receive, send_logged)
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_logged)
        finally:
            batch = scope["state"].get("batch_size")
            log.info("%s %s %d %.1fms batch=%s", scope["method"], scope["path"], status["code"],
                     (time.perf_counter() - start) * 1000, batch if batch is not None else "-")

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None when it is over the limit. An oversized body is still read (and
        dropped) up to DRAIN_BYTES, so that the client, which writes before it reads, gets the 413
        instead of a connection reset."""
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size <= self.max_body:
                chunks.append(chunk)
            elif size > self.max_body + DRAIN_BYTES:
                break
            if not msg.get("more_body", False):
                break
        return None if size > self.max_body else b"".join(chunks)


def _int(value: bytes | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


# ------------------------------------------------------------ request parsing


async def _fields(request: Request) -> tuple[bytes, dict[str, str]]:
    """multipart/form-data (an 'image' file + text fields) or JSON ('image' base64 / data URL) ->
    (image bytes, other fields)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=16)
        image = form.get("image")
        if image is None:
            raise InputError(400, "missing field 'image': upload the image as a file field named 'image'", "image")
        if isinstance(image, UploadFile):
            data = await image.read()
        else:
            data = decode_base64(image, "image")
        return data, {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
    if ctype == "application/json":
        try:
            obj = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(400, f"the body is not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise InputError(400, "the body must be a JSON object")
        if "image" not in obj:
            raise InputError(400, "missing field 'image': give the image as base64 or a data: URL", "image")
        data = decode_base64(obj["image"], "image")
        other = {}
        for k, v in obj.items():
            if k == "image" or v is None:
                continue
            if not isinstance(v, str):
                raise InputError(400, f"field '{k}' must be a string", k)
            other[k] = v
        return data, other
    raise InputError(415, "send multipart/form-data with an 'image' file, or application/json with a base64 'image'")


def _text(fields: dict[str, str], name: str, required: bool) -> str | None:
    value = fields.get(name)
    if value is None or not value.strip():
        if required:
            what = "empty" if value is not None else "missing"
            raise InputError(400, f"the {name} is {what}: send a non-empty '{name}' field", name)
        return None
    if len(value) > MAX_TEXT_CHARS:
        raise InputError(400, f"the {name} is {len(value)} characters, over the limit of {MAX_TEXT_CHARS}", name)
    return value.strip()


# ------------------------------------------------------------ the app


def create_app(engine: Engine, config: ServeConfig | None = None) -> FastAPI:
    cfg = config or ServeConfig()
    batcher = Batcher(engine.run_group, window_s=cfg.window_ms / 1000.0, max_batch=cfg.max_batch, max_queue=cfg.max_queue)
    model_ids = [COMPOSED_MODEL] + [n for n in engine.names if n != COMPOSED_MODEL]
    started = int(time.time())
    state = {"shutting_down": False}

    @asynccontextmanager
    async def lifespan(app):
        yield
        # Uvicorn calls this after in-flight requests have finished: stop the worker cleanly.
        state["shutting_down"] = True
        await run_in_threadpool(batcher.close, 30.0)

    # No /docs: FastAPI's Swagger page loads its scripts from a CDN, and this server ships no
    # page that needs the network. The schema is still at /openapi.json.
    app = FastAPI(title="rsmoe", summary="RS-MoE captioning and VQA", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.engine, app.state.config = batcher, engine, cfg
    app.add_middleware(RequestGuard, max_body_bytes=cfg.max_body_bytes)

    @app.exception_handler(InputError)
    async def _input_error(request, exc: InputError):
        return _error(exc.status, str(exc), exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            msg = (f"no such endpoint {request.method} {request.url.path}: the API is /v1/caption, /v1/ask, "
                   "/v1/chat/completions, /v1/models, /health (schema: GET /openapi.json)")
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        return _error(exc.status_code, msg)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}: {exc}); the server keeps running")

    async def pixels(data: bytes):
        return await run_in_threadpool(load_pixels, data, engine.image_size, engine.image_mean, engine.image_std,
                                       cfg.max_pixels)

    async def generate(request: Request, key, job) -> Done:
        try:
            fut = batcher.submit(key, job)
        except QueueFull as exc:
            raise InputError(503, f"the server is busy ({exc}): retry in a moment") from None
        except Closed:
            raise InputError(503, "the server is shutting down: retry on another instance") from None
        try:
            done: Done = await asyncio.wait_for(asyncio.wrap_future(fut), cfg.request_timeout_s)
        except TimeoutError:
            fut.cancel()  # still queued: it will not run; already running: its result is dropped
            raise InputError(504, f"no answer from the model within {cfg.request_timeout_s:g} s "
                                  f"({batcher.depth} requests waiting): retry later") from None
        request.state.batch_size = done.batch_size
        return done

    def timing(done: Done, t0: float) -> dict:
        return {"queue_ms": round(done.queue_s * 1000, 1), "generate_ms": round(done.run_s * 1000, 1),
                "total_ms": round((time.perf_counter() - t0) * 1000, 1), "batch_size": done.batch_size}

    # ---------------------------------------------------------------- routes
    @app.post("/v1/caption")
    async def caption(request: Request):
        t0 = time.perf_counter()
        data, f = await _fields(request)
        instruction = _text(f, "instruction", required=False)
        px = await pixels(data)
        done = await generate(request, ("caption", cfg.caption), CaptionJob(px, instruction))
        return {"model": COMPOSED_MODEL, "instruction": instruction, **done.value, "timing": timing(done, t0)}

    @app.post("/v1/ask")
    async def ask(request: Request):
        t0 = time.perf_counter()
        data, f = await _fields(request)
        question = _text(f, "question", required=True)
        qtype = _text(f, "type", required=False)
        px = await pixels(data)
        done = await generate(request, ("answer", cfg.answer), AnswerJob(px, question, qtype))
        return {"model": COMPOSED_MODEL, "question": question, "type": qtype, **done.value, "timing": timing(done, t0)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(400, f"the body is not valid JSON ({exc})") from None
        req = parse_chat(body, model_ids)
        if len(req.text) > MAX_TEXT_CHARS:
            raise InputError(400, f"the message is {len(req.text)} characters, over the limit of {MAX_TEXT_CHARS}", "messages")
        px = await pixels(req.image)
        expert = None if req.model == COMPOSED_MODEL else req.model
        if req.task == "caption":
            settings = cfg.caption if req.max_tokens is None else GenSettings(req.max_tokens, cfg.caption.num_beams,
                                                                                  cfg.caption.repetition_penalty)
            job = CaptionJob(px, req.text or None, None if expert is None else (expert,))
            done = await generate(request, ("caption", settings), job)
            r = done.value
            content = r["caption"] if expert is None else r["experts"][expert]
            # The composed caption leaves cut-off fragments out, so it ends cleanly; one expert's text may not.
            finish = "length" if expert is not None and r["truncated"] else "stop"
            extra = {"task": "caption", "experts": r["experts"], "truncated": r["truncated"]}
        else:
            settings = cfg.answer if req.max_tokens is None else GenSettings(req.max_tokens, cfg.answer.num_beams,
                                                                                 cfg.answer.repetition_penalty)
            done = await generate(request, ("answer", settings), AnswerJob(px, req.text, req.question_type, expert))
            r = done.value
            content, finish = r["answer"], ("length" if r["truncated"] else "stop")
            extra = {"task": "ask", "expert": r["expert"], "router_confidence": r["router_confidence"]}
        extra["timing"] = timing(done, t0)
        out = completion(req.model, content, finish, extra)
        if req.stream:
            return StreamingResponse(iter(stream_events(out)), media_type="text/event-stream")
        return out

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": started, "owned_by": "rsmoe"}
                                           for m in model_ids]}

    @app.get("/health")
    async def health():
        return {
            "status": "shutting_down" if state["shutting_down"] else "ok",
            "stage": engine.trained.stage,
            "experts": engine.names,
            "device": str(engine.trained.device),
            "queue": batcher.depth,
            "batching": {"window_ms": cfg.window_ms, "max_batch": cfg.max_batch},
            "generate_calls": batcher.stats.calls,
            "requests_served": batcher.stats.jobs,
            "largest_batch": batcher.stats.largest,
            "limits": {"max_body_bytes": cfg.max_body_bytes, "max_pixels": cfg.max_pixels,
                       "request_timeout_s": cfg.request_timeout_s},
            "generation": {"caption": asdict(cfg.caption), "answer": asdict(cfg.answer)},
        }

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
