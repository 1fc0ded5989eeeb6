"""OpenAI-compatible HTTP server (FastAPI + uvicorn): `create_app(llm)`, run by `scripts/serve.py`.

Endpoints: POST /v1/chat/completions, /v1/completions, /v1/responses and Anthropic's /v1/messages
(whole or streamed as server-sent events), POST /tokenize and /detokenize, GET /v1/models,
/health, /metrics (Prometheus). Requests go through the LLM's continuous-batching scheduler,
driven by one engine thread (worker.py); errors come back in OpenAI's `{"error": {...}}` shape
(Anthropic's under /v1/messages; errors.py). Field policy: protocol.py; tool_choice: chat.py.
Offline batch files: batch.py.

Needs the `server` extra (fastapi, uvicorn, prometheus-client); nothing outside this package
imports it.
"""

from .app import create_app

__all__ = ["create_app"]
