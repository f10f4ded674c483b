"""`rsmoe serve`: a trained RS-MoE over HTTP (caption, ask, OpenAI-compatible chat) and a web page.

Components, each usable without the others:
- `images`: safe decoding of uploaded bytes (format allow-list, pixel limit before decoding).
- `batcher`: the cross-request batcher (one worker thread; requests arriving together share one call).
- `engine`: batched caption / answer generation over a loaded model, per-request expert choice.
- `app`: the FastAPI routes and middleware (body limit, one log line per request, errors as JSON).
The command is rsmoe/cli/serve.py (`rsmoe serve`).
"""
