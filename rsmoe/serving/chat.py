"""The OpenAI chat-completions surface: request parsing, caption-vs-question, response shapes.

Pure functions (no HTTP, no model), so every rule here is unit-tested on its own.

How a chat request becomes a task:
- the image is the last `image_url` content part in the user messages (so a follow-up question
  may leave it out); it must be a `data:` URL: the server never fetches a URL;
- the text is the last user message's text parts, joined by a space (RS-MoE has no chat memory:
  earlier turns and system messages are not fed to the model);
- the task is the request's `task` field ("caption" or "ask") when given (OpenAI clients pass it
  with `extra_body`); otherwise: no text -> caption with the default instruction; text that asks
  for a description (describe / description / caption / summarise / summary) -> caption with the
  text as its instruction; anything else -> a question;
- `model` "rsmoe": the composed caption, or the router's expert answers; an expert's name: that
  expert alone writes the caption, or answers.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass

from rsmoe.serving.images import InputError, decode_base64

CAPTION_INTENT = re.compile(r"\b(describe|description|caption|captions|summari[sz]e|summary)\b", re.IGNORECASE)
TASKS = ("caption", "ask")
MAX_TOKENS_LIMIT = 512


@dataclass
class ChatRequest:
    model: str
    task: str  # "caption" | "ask"
    text: str  # the instruction (caption) or the question (ask); "" = default instruction
    image: bytes
    question_type: str | None = None
    max_tokens: int | None = None
    stream: bool = False


def classify(text: str) -> str:
    """'caption' or 'ask' for a message without an explicit `task` (rules in the module doc)."""
    t = text.strip()
    if not t or CAPTION_INTENT.search(t):
        return "caption"
    return "ask"


def _parts(content) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return content
    raise InputError(400, "a message's 'content' must be a string or a list of content parts", "messages")


def _image_bytes(part: dict) -> bytes:
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise InputError(400, "an image_url part has no 'url': use {\"image_url\": {\"url\": \"data:image/png;base64,...\"}}",
                         "messages")
    if re.match(r"^https?://", url, re.IGNORECASE):
        raise InputError(400, "image URLs are not fetched: send the image inline as a data: URL (data:image/png;base64,...)",
                         "messages")
    if not url.startswith("data:"):
        raise InputError(400, "an image_url must be a data: URL (data:image/png;base64,...)", "messages")
    return decode_base64(url, "image_url")


def parse_chat(body, model_ids: list[str]) -> ChatRequest:
    if not isinstance(body, dict):
        raise InputError(400, "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InputError(400, f"missing field 'model': one of {', '.join(model_ids)}", "model")
    if model not in model_ids:
        raise InputError(404, f"unknown model '{model}': use one of {', '.join(model_ids)} (GET /v1/models)", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError(400, "missing field 'messages': a non-empty list of chat messages", "messages")
    if any(not isinstance(m, dict) for m in messages):
        raise InputError(400, "each message must be an object with 'role' and 'content'", "messages")
    user = [m for m in messages if m.get("role") == "user"]
    if not user:
        raise InputError(400, "no user message: add {\"role\": \"user\", \"content\": [...]}", "messages")
    image = None
    for m in reversed(user):
        for p in reversed(_parts(m.get("content"))):
            if p.get("type") == "image_url":
                image = _image_bytes(p)
                break
        if image is not None:
            break
    if image is None:
        raise InputError(400, "no image: add a content part "
                              "{\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}}",
                         "messages")
    texts = []
    for p in _parts(user[-1].get("content")):
        if p.get("type") == "text":
            if not isinstance(p.get("text"), str):
                raise InputError(400, "a text part's 'text' must be a string", "messages")
            texts.append(p["text"].strip())
    text = " ".join(t for t in texts if t)
    task = body.get("task")
    if task is None:
        task = classify(text)
    elif task not in TASKS:
        raise InputError(400, f"field 'task' must be one of {', '.join(TASKS)}", "task")
    if task == "ask" and not text:
        raise InputError(400, "the question is empty: put it in a text part of the last user message", "messages")
    n = body.get("n", 1)
    if n not in (1, None):
        raise InputError(400, "only n=1 is supported (generation is greedy/beam: n copies would be identical)", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or not 1 <= max_tokens <= MAX_TOKENS_LIMIT):
        raise InputError(400, f"'max_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}", "max_tokens")
    qtype = body.get("question_type")
    if qtype is not None and not isinstance(qtype, str):
        raise InputError(400, "field 'question_type' must be a string (presence, count, comp, rural_urban, ...)", "question_type")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InputError(400, "field 'stream' must be true or false", "stream")
    return ChatRequest(model, task, text, image, qtype, max_tokens, stream)


def completion(model: str, content: str, finish_reason: str, extra: dict) -> dict:
    """A `chat.completion` object as the OpenAI API returns it (`rsmoe` holds what is ours)."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "rsmoe": extra,
    }


def stream_events(done: dict) -> list[str]:
    """A finished completion as server-sent events: role+content chunk, finish chunk, [DONE]."""
    base = {"id": done["id"], "object": "chat.completion.chunk", "created": done["created"], "model": done["model"]}
    choice = done["choices"][0]
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": choice["message"]["content"]},
                              "logprobs": None, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}],
         "rsmoe": done["rsmoe"]},
    ]
    return [f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
