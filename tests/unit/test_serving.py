"""`rsmoe serve`: the cross-request batcher (against rsmoe.inference run per image), safe image
decoding, the bad-input matrix over real HTTP, the OpenAI chat surface (with the openai client),
timeouts and a graceful SIGTERM shutdown."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.helpers.serving import (
    ANSWER_TOKENS,
    CAPTION_TOKENS,
    IMAGES,
    ServerThread,
    data_url,
    pixels,
    read,
    serve_config,
)

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -r requirements-serve.txt")
httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -r requirements-serve.txt")


# ---------------------------------------------------------------- fixtures


from tests.helpers.serving import engine_fixture, run_dirs_fixture, trained_fixture  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="module")
def server(engine):
    from rsmoe.serving.app import create_app

    with ServerThread(create_app(engine, serve_config())) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# ---------------------------------------------------------------- the batcher on the real model


def test_concurrent_submits_make_one_generate_call_and_each_caller_gets_its_own_result(trained, engine, monkeypatch):
    from rsmoe.config import GenerationArgs
    from rsmoe.inference.generate import caption
    from rsmoe.serving.batcher import Batcher
    from rsmoe.serving.engine import CaptionJob, GenSettings

    rows: list[int] = []
    original = trained.model.experts.generate

    def counting_generate(prefix, input_ids, *a, **kw):
        rows.append(input_ids.shape[0])
        return original(prefix, input_ids, *a, **kw)

    instructions = [None, "Describe the buildings.", "What is in this picture? Describe it.", None]
    gen = GenSettings(CAPTION_TOKENS)
    px = [pixels(trained, p) for p in IMAGES]
    # The reference: rsmoe.inference.caption, one image per call.
    expected = [caption(trained.model, trained.processor, torch.from_numpy(p[None]), [i], GenerationArgs(CAPTION_TOKENS))[0]
                for p, i in zip(px, instructions)]
    assert len({json_key(e) for e in expected}) > 1, "the images must caption differently for this test to mean anything"

    monkeypatch.setattr(trained.model.experts, "generate", counting_generate)
    batcher = Batcher(engine.run_group, window_s=1.0, max_batch=len(IMAGES))
    try:
        barrier = threading.Barrier(len(IMAGES))

        def call(k):
            barrier.wait()
            return batcher.submit(("caption", gen), CaptionJob(px[k], instructions[k])).result(timeout=120)

        with ThreadPoolExecutor(len(IMAGES)) as pool:
            done = list(pool.map(call, range(len(IMAGES))))
    finally:
        batcher.close()
    assert rows == [len(IMAGES) * len(engine.names)]  # one call: requests x experts rows
    assert [d.batch_size for d in done] == [len(IMAGES)] * len(IMAGES)
    assert [d.value for d in done] == expected


def json_key(d):
    return json.dumps(d, sort_keys=True)


def test_engine_answers_like_inference_and_experts_can_be_chosen(trained, engine):
    from rsmoe.config import GenerationArgs
    from rsmoe.inference.generate import answer, caption
    from rsmoe.serving.engine import AnswerJob, CaptionJob

    px = [pixels(trained, p) for p in IMAGES[:3]]
    qs = ["How many buildings are there?", "Is the road next to the river?", "What kind of scene is this?"]
    ref = [answer(trained.model, trained.processor, torch.from_numpy(p[None]), [q], None, GenerationArgs(ANSWER_TOKENS))[0]
           for p, q in zip(px, qs)]
    got = engine.answer([AnswerJob(p, q) for p, q in zip(px, qs)], GenerationArgs(ANSWER_TOKENS))
    assert [(g["answer"], g["expert"]) for g in got] == [(r["answer"], r["expert"]) for r in ref]
    assert [g["expert"] for g in got] == ["objects", "relations", "theme"]
    assert all(g["router_confidence"] is None for g in got)

    # A named expert answers instead of the router's choice.
    forced = engine.answer([AnswerJob(px[0], qs[0], expert="theme")], GenerationArgs(ANSWER_TOKENS))[0]
    assert forced["expert"] == "theme"
    # One expert alone writes the text it writes among all experts; the caption is that text alone.
    full = caption(trained.model, trained.processor, torch.from_numpy(px[1][None]), None, GenerationArgs(CAPTION_TOKENS))[0]
    alone = engine.caption([CaptionJob(px[1], None, ("relations",)), CaptionJob(px[0])], GenerationArgs(CAPTION_TOKENS))
    assert alone[0]["experts"] == {"relations": full["experts"]["relations"]}
    assert list(alone[1]["experts"]) == engine.names


def test_stage1_model_serves_its_single_expert(run_dirs):
    from rsmoe.config import GenerationArgs
    from rsmoe.inference.generate import answer, caption
    from rsmoe.inference.load import load_trained
    from rsmoe.serving.engine import AnswerJob, CaptionJob, Engine

    t1 = load_trained(run_dirs["stage1"], "cpu")
    eng = Engine(t1)
    px = pixels(t1, IMAGES[0])
    got = eng.caption([CaptionJob(px, "Describe the roads.")], GenerationArgs(CAPTION_TOKENS))[0]
    ref = caption(t1.model, t1.processor, torch.from_numpy(px[None]), ["Describe the roads."], GenerationArgs(CAPTION_TOKENS))[0]
    assert got == ref and list(got["experts"]) == ["llm"]
    q = "How many roads are there?"
    got = eng.answer([AnswerJob(px, q)], GenerationArgs(ANSWER_TOKENS))[0]
    ref = answer(t1.model, t1.processor, torch.from_numpy(px[None]), [q], None, GenerationArgs(ANSWER_TOKENS))[0]
    assert (got["answer"], got["expert"]) == (ref["answer"], "llm")


# ---------------------------------------------------------------- the batcher's logic


def test_batcher_groups_by_key_respects_max_batch_and_isolates_failures():
    from rsmoe.serving.batcher import Batcher

    calls: list[tuple[str, list]] = []

    def run_group(key, payloads):
        calls.append((key, list(payloads)))
        if "boom" in payloads:
            raise ValueError("bad payload")
        return [f"{key}:{p}" for p in payloads]

    b = Batcher(run_group, window_s=0.3, max_batch=4)
    try:
        futs = [b.submit("a" if i % 2 else "b", i) for i in range(6)] + [b.submit("a", "boom")]
        results = [f.result(timeout=10) for f in futs[:6]]
        with pytest.raises(ValueError, match="bad payload"):
            futs[6].result(timeout=10)
    finally:
        b.close()
    assert [r.value for r in results] == [f"{'a' if i % 2 else 'b'}:{i}" for i in range(6)]
    # 7 jobs, max 4 per cycle: cycle 1 takes jobs 0-3 (two groups), cycle 2 takes 4-6.
    assert [(k, p) for k, p in calls[:4]] == [("b", [0, 2]), ("a", [1, 3]), ("b", [4]), ("a", [5, "boom"])]
    assert calls[4:] == [("a", [5]), ("a", ["boom"])]  # the failed group retried one by one
    assert futs[5].result().value == "a:5"


def test_a_job_queued_during_a_generation_waits_for_the_peers_that_follow_it():
    from rsmoe.serving.batcher import Batcher

    gate = threading.Event()
    calls: list[list] = []

    def run_group(key, payloads):
        calls.append(list(payloads))
        if payloads == ["first"]:
            gate.wait(10)
        return payloads

    b = Batcher(run_group, window_s=0.3, max_batch=8)
    try:
        first = b.submit("k", "first")
        time.sleep(0.4)  # "first" is generating; "queued" arrives and waits
        queued = b.submit("k", "queued")
        time.sleep(0.4)  # longer than the window: measured from its arrival, it would be over
        gate.set()  # the generation ends; its caller sends its next request a moment later
        time.sleep(0.05)
        follower = b.submit("k", "follower")
        assert queued.result(timeout=5).batch_size == follower.result(timeout=5).batch_size == 2
        assert first.result().batch_size == 1
    finally:
        b.close()
    assert calls == [["first"], ["queued", "follower"]]


def test_batcher_without_batching_skips_cancelled_jobs_and_drains_on_close():
    from rsmoe.serving.batcher import Batcher, Closed, QueueFull

    gate = threading.Event()
    seen: list = []

    def run_group(key, payloads):
        gate.wait(10)
        seen.append(list(payloads))
        return payloads

    b = Batcher(run_group, window_s=0.0, max_batch=1, max_queue=2)
    first = b.submit("k", 1)
    time.sleep(0.2)  # the worker is now blocked in run_group with job 1
    second, third = b.submit("k", 2), b.submit("k", 3)
    with pytest.raises(QueueFull):
        b.submit("k", 4)
    assert third.cancel()
    gate.set()
    b.close(10)
    with pytest.raises(Closed):
        b.submit("k", 5)
    assert first.result().value == 1 and second.result().value == 2 and third.cancelled()
    assert seen == [[1], [2]]


# ---------------------------------------------------------------- images


def png_with_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims width x height (the decoder is never reached)."""
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_image_checks_happen_before_decoding():
    from rsmoe.serving.images import InputError, check_image, decode_base64

    assert check_image(read(IMAGES[0]))[:1] == ("PNG",)
    with pytest.raises(InputError) as e:
        check_image(png_with_size(8000, 8000), max_pixels=40_000_000)
    assert e.value.status == 413 and "8000 x 8000 = 64,000,000 pixels, over the limit of 40,000,000" in str(e.value)
    with pytest.raises(InputError) as e:  # over PIL's own limit: it refuses while reading the header
        check_image(png_with_size(50_000, 50_000), max_pixels=40_000_000)
    assert e.value.status == 413 and "too many pixels" in str(e.value)
    with pytest.raises(InputError) as e:
        check_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")  # EPS: never handed to Ghostscript
    assert e.value.status == 415
    assert decode_base64(data_url(IMAGES[0]), "image") == read(IMAGES[0])
    for bad in ("not base64!", "data:image/png,rawbytes", ""):
        with pytest.raises(InputError) as e:
            decode_base64(bad, "image")
        assert e.value.status == 400


# ---------------------------------------------------------------- HTTP


def test_caption_and_ask_endpoints_match_the_engine(client, trained, engine):
    from rsmoe.config import GenerationArgs
    from rsmoe.inference.generate import answer, caption

    px = torch.from_numpy(pixels(trained, IMAGES[0])[None])
    want = caption(trained.model, trained.processor, px, None, GenerationArgs(CAPTION_TOKENS))[0]
    r = client.post("/v1/caption", files={"image": ("a.png", read(IMAGES[0]), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: body[k] for k in ("experts", "caption", "truncated")} == want
    assert set(body["timing"]) == {"queue_ms", "generate_ms", "total_ms", "batch_size"}
    # JSON with base64 gives the same result as the upload; a data URL works too.
    r2 = client.post("/v1/caption", json={"image": base64.b64encode(read(IMAGES[0])).decode()})
    r3 = client.post("/v1/caption", json={"image": data_url(IMAGES[0])})
    assert r2.json()["experts"] == r3.json()["experts"] == want["experts"]
    # An instruction changes what the Q-Former reads and the experts' prompts.
    instr = "Describe the buildings."
    want_i = caption(trained.model, trained.processor, px, [instr], GenerationArgs(CAPTION_TOKENS))[0]
    r = client.post("/v1/caption", data={"instruction": instr}, files={"image": ("a.png", read(IMAGES[0]), "image/png")})
    assert r.json()["experts"] == want_i["experts"] and r.json()["instruction"] == instr

    q = "Is the road next to the river?"
    ref = answer(trained.model, trained.processor, px, [q], ["presence"], GenerationArgs(ANSWER_TOKENS))[0]
    r = client.post("/v1/ask", data={"question": q, "type": "presence"}, files={"image": ("a.png", read(IMAGES[0]))})
    assert r.status_code == 200, r.text
    a = r.json()
    assert (a["answer"], a["expert"], a["type"]) == (ref["answer"], "objects", "presence")  # the type wins over keywords
    assert "router_confidence" in a and a["router_confidence"] is None
    r = client.post("/v1/ask", json={"image": data_url(IMAGES[0]), "question": q})
    assert r.json()["expert"] == "relations"


def test_concurrent_http_requests_share_a_generate_call(client, server):
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda p: client.post("/v1/caption", json={"image": data_url(p)}), IMAGES))
    assert all(r.status_code == 200 for r in rs)
    assert max(r.json()["timing"]["batch_size"] for r in rs) > 1
    # Batched or not, each caller gets the caption of its own image.
    for p, r in zip(IMAGES, rs):
        alone = client.post("/v1/caption", json={"image": data_url(p)}).json()
        assert r.json()["experts"] == alone["experts"]


def truncated(path: str, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, fmt)
    data = buf.getvalue()
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    """A real decompression bomb: 14000 x 14000 one-bit pixels in a few kB (over PIL's own limit)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (14_000, 14_000)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def test_bad_input_matrix(client, caplog):
    png = read(IMAGES[0])
    up = lambda data, **fields: dict(files={"image": ("x.png", data, "image/png")}, data=fields)
    chat = lambda **kw: {"model": "rsmoe", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe the image."}, {"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}}]}], **kw}
    cases = [
        # (what, path, request kwargs, status, message fragment)
        ("not an image", "/v1/caption", up(b"just some text, not pixels"), 415, "not an image"),
        ("truncated PNG", "/v1/caption", up(truncated(IMAGES[0], "PNG")), 400, "truncated or corrupt"),
        ("truncated JPEG", "/v1/caption", up(truncated(IMAGES[0], "JPEG")), 400, "truncated or corrupt"),
        ("header over the pixel limit", "/v1/caption", up(png_with_size(2000, 2000)), 413, "over the limit of 1,000,000"),
        ("decompression bomb", "/v1/ask", up(bomb_png(), question="Is it?"), 413, "too many pixels"),
        ("body over the limit", "/v1/caption", up(b"\0" * (3 * 1024 * 1024)), 413, "request body is over the limit"),
        ("missing image", "/v1/caption", dict(data={"instruction": "x"}, files={"other": ("a", b"x")}), 400, "missing field 'image'"),
        ("missing question", "/v1/ask", up(png), 400, "question is missing"),
        ("empty question", "/v1/ask", up(png, question="   "), 400, "question is empty"),
        ("bad base64", "/v1/caption", dict(json={"image": "%%% not base64 %%%"}), 400, "not valid base64"),
        ("not JSON", "/v1/caption", dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        ("wrong content type", "/v1/ask", dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "multipart/form-data"),
        ("unknown model", "/v1/chat/completions", dict(json={**chat(), "model": "gpt-4o"}), 404, "unknown model 'gpt-4o'"),
        ("http image URL", "/v1/chat/completions", dict(json={"model": "rsmoe", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}), 400, "not fetched"),
        ("no image in chat", "/v1/chat/completions", dict(json={"model": "rsmoe", "messages": [
            {"role": "user", "content": "Is there a road?"}]}), 400, "no image"),
        ("missing messages", "/v1/chat/completions", dict(json={"model": "rsmoe"}), 400, "missing field 'messages'"),
        ("n > 1", "/v1/chat/completions", dict(json=chat(n=2)), 400, "only n=1"),
        ("unknown endpoint", "/v1/embeddings", dict(json={}), 404, "no such endpoint"),
        ("question over the length limit", "/v1/ask", up(png, question="Is it? " * 400), 400, "over the limit of 2000"),
    ]
    with caplog.at_level(logging.INFO, logger="rsmoe.serving"):
        for what, path, kw, status, fragment in cases:
            r = client.post(path, **kw)
            assert r.status_code == status, (what, r.status_code, r.text)
            err = r.json()["error"]
            assert fragment in err["message"] and "\n" not in err["message"], (what, err)
        r = client.get("/v1/caption")
        assert r.status_code == 405 and r.json()["error"]["message"] == "GET is not allowed on /v1/caption"
        # Chunked upload (no Content-Length) over the limit is cut off too.
        r = client.post("/v1/caption", content=iter([b"\0" * (1024 * 1024)] * 3), headers={"content-type": "application/json"})
        assert r.status_code == 413
        # ... and the server still serves.
        ok = client.post("/v1/caption", files={"image": ("x.png", png, "image/png")})
        assert ok.status_code == 200
        # The log line is written once the response is out: give the server thread a moment.
        deadline = time.monotonic() + 5
        while True:
            lines = [rec.getMessage() for rec in caplog.records if rec.name == "rsmoe.serving"]
            if any(ln.startswith("POST /v1/caption 200 ") for ln in lines) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert any(ln.startswith("POST /v1/caption 415 ") and ln.endswith("batch=-") for ln in lines)
    assert any(re.fullmatch(r"POST /v1/caption 200 \d+\.\dms batch=1", ln) for ln in lines), lines


def test_models_and_health(client, engine):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["rsmoe"] + engine.names
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["experts"] == engine.names and h["batching"]["max_batch"] == 8


# ---------------------------------------------------------------- the chat API


@pytest.mark.parametrize("text,task", [
    ("", "caption"), ("Describe this remote sensing image in detail.", "caption"),
    ("Can you describe what you see?", "caption"), ("Write a caption for this.", "caption"),
    ("Give me a short summary of the scene", "caption"), ("Is there a road?", "ask"),
    ("How many buildings are there?", "ask"), ("Count the cars", "ask"), ("what is the land use?", "ask"),
])
def test_chat_message_classification(text, task):
    from rsmoe.serving.chat import classify

    assert classify(text) == task


def test_chat_parsing_rules():
    from rsmoe.serving.chat import parse_chat
    from rsmoe.serving.images import InputError

    ids = ["rsmoe", "theme", "objects", "relations"]
    img = {"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}}
    # A follow-up question may leave the image in an earlier user turn; only the last user text counts.
    req = parse_chat({"model": "objects", "messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "text", "text": "Describe it."}, img]},
        {"role": "assistant", "content": "A city."},
        {"role": "user", "content": "Is there a river?"}]}, ids)
    assert (req.model, req.task, req.text, req.image) == ("objects", "ask", "Is there a river?", read(IMAGES[0]))
    # An explicit task wins over the text.
    req = parse_chat({"model": "rsmoe", "task": "caption", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Is it urban?"}, img]}]}, ids)
    assert req.task == "caption" and req.text == "Is it urban?"
    with pytest.raises(InputError, match="question is empty"):
        parse_chat({"model": "rsmoe", "task": "ask", "messages": [{"role": "user", "content": [img]}]}, ids)
    with pytest.raises(InputError, match="max_tokens"):
        parse_chat({"model": "rsmoe", "max_tokens": 0, "messages": [{"role": "user", "content": [img]}]}, ids)


def test_chat_completions_shape_and_routing(client, engine):
    img = {"type": "image_url", "image_url": {"url": data_url(IMAGES[1])}}
    cap = client.post("/v1/caption", json={"image": data_url(IMAGES[1])}).json()

    r = client.post("/v1/chat/completions", json={"model": "rsmoe", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Describe this remote sensing image in detail."}, img]}]})
    assert r.status_code == 200, r.text
    c = r.json()
    assert c["object"] == "chat.completion" and c["id"].startswith("chatcmpl-") and c["model"] == "rsmoe"
    assert isinstance(c["created"], int) and len(c["choices"]) == 1
    ch = c["choices"][0]
    assert ch["index"] == 0 and ch["message"]["role"] == "assistant" and ch["finish_reason"] in ("stop", "length")
    assert ch["message"]["content"] == cap["caption"] and c["rsmoe"]["experts"] == cap["experts"]

    r = client.post("/v1/chat/completions", json={"model": "objects", "messages": [{"role": "user", "content": [img]}]})
    c = r.json()
    assert c["choices"][0]["message"]["content"] == cap["experts"]["objects"] and list(c["rsmoe"]["experts"]) == ["objects"]
    assert c["choices"][0]["finish_reason"] == ("length" if "objects" in cap["truncated"] else "stop")

    q = "How many buildings are there?"
    ask = client.post("/v1/ask", json={"image": data_url(IMAGES[1]), "question": q}).json()
    r = client.post("/v1/chat/completions", json={"model": "rsmoe", "messages": [
        {"role": "user", "content": [{"type": "text", "text": q}, img]}]})
    c = r.json()
    assert c["choices"][0]["message"]["content"] == ask["answer"]
    assert c["rsmoe"]["expert"] == ask["expert"] == "objects" and c["rsmoe"]["router_confidence"] is None


def test_openai_client_against_the_server(server, client, engine):
    openai = pytest.importorskip("openai", reason="openai is not installed: pip install -r requirements-serve.txt")
    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in oc.models.list()] == ["rsmoe"] + engine.names
    img = {"type": "image_url", "image_url": {"url": data_url(IMAGES[2])}}
    cap = client.post("/v1/caption", json={"image": data_url(IMAGES[2])}).json()
    out = oc.chat.completions.create(model="rsmoe", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Describe this image."}, img]}])
    assert out.choices[0].message.content == client.post(
        "/v1/caption", json={"image": data_url(IMAGES[2]), "instruction": "Describe this image."}).json()["caption"]
    out = oc.chat.completions.create(model="theme", messages=[{"role": "user", "content": [img]}])
    assert out.choices[0].message.content == cap["experts"]["theme"]
    # rsmoe's own fields ride along in `model_extra`; `extra_body` sends ours (an explicit task).
    out = oc.chat.completions.create(model="rsmoe", extra_body={"task": "caption"}, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Is it urban?"}, img]}])
    assert out.model_extra["rsmoe"]["task"] == "caption" and set(out.model_extra["rsmoe"]["experts"]) == set(engine.names)
    out = oc.chat.completions.create(model="rsmoe", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Is it urban?"}, img]}])
    assert out.model_extra["rsmoe"]["task"] == "ask" and out.model_extra["rsmoe"]["expert"] == "theme"
    # Streaming: the whole text arrives as chunks, then the finish reason.
    stream = oc.chat.completions.create(model="theme", messages=[{"role": "user", "content": [img]}], stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cap["experts"]["theme"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # Errors come back as the client's own exception types with our message.
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        oc.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": [img]}])
    with pytest.raises(openai.BadRequestError, match="not fetched"):
        oc.chat.completions.create(model="rsmoe", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]}])


# ---------------------------------------------------------------- timeouts, start-up and shutdown


def test_a_request_that_waits_too_long_gets_504(engine, client):
    from rsmoe.serving.app import create_app

    # The window (1 s) is longer than the timeout: the request is given up while still queued, so it
    # never runs; the server stays up.
    with ServerThread(create_app(engine, serve_config(window_ms=1000, request_timeout_s=0.05))) as s:
        r = httpx.post(s.url + "/v1/caption", json={"image": data_url(IMAGES[0])}, timeout=30)
        assert r.status_code == 504 and "within 0.05 s" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
        time.sleep(1.2)
        assert httpx.get(s.url + "/health").json()["requests_served"] == 0  # the cancelled job was dropped


def test_start_refuses_a_missing_or_incomplete_model(tmp_path, capsys, run_dirs):
    from rsmoe.cli import main

    assert main(["serve", "--model", str(tmp_path / "none"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rsmoe serve: error:") and "does not exist" in err[0]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["serve", "--model", str(tmp_path / "run"), "--port", "0"]) == 2
    assert "without a finished model" in capsys.readouterr().err
    assert main(["serve", "--model", str(run_dirs["stage2"]), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err


