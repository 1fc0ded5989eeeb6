"""OpenAI's batch file format, run offline (vLLM's run-batch; scripts/run_batch.py).

Each input line is a request, `{"custom_id", "method": "POST", "url": "/v1/chat/completions",
"body": {...}}` (any POST route of the server: chat, completions, responses, messages,
tokenize); each output line its answer, `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`, in the input's order. A request the server refuses is answered
like any other (its status code and error body); `error` is set only for a line that is not a
request at all. The requests go to the server's app in this process (no socket), all of them at
once up to `concurrency`, so the scheduler batches them as it would a server's clients.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Callable, Iterable

import httpx
from fastapi import FastAPI


def _line_error(custom_id: Any, message: str) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": "invalid_request", "message": message}}


def _parse(number: int, line: str, seen: set[str]) -> dict[str, Any]:
    """The request on line `number` (1-based), or its error entry (with an "error" key)."""
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        return _line_error(None, f"line {number}: not JSON ({e})")
    if not isinstance(req, dict):
        return _line_error(None, f"line {number}: a request is a JSON object")
    custom_id = req.get("custom_id")
    problem = None
    if not isinstance(custom_id, str) or not custom_id:
        problem = "custom_id must be a non-empty string"
    elif custom_id in seen:
        problem = f"custom_id {custom_id!r} is used twice"
    elif req.get("method") != "POST":
        problem = f"method must be POST, got {req.get('method')!r}"
    elif not isinstance(req.get("url"), str) or not req["url"].startswith("/"):
        problem = "url must be a path such as /v1/chat/completions"
    elif not isinstance(req.get("body"), dict):
        problem = "body must be a JSON object"
    elif req["body"].get("stream"):
        problem = "stream is not supported in a batch"
    if problem:
        return _line_error(custom_id if isinstance(custom_id, str) else None, f"line {number}: {problem}")
    seen.add(custom_id)
    return {"custom_id": custom_id, "url": req["url"], "body": req["body"]}


async def run_batch(app: FastAPI, lines: Iterable[str], *, concurrency: int = 256,
                    progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """The output entries for the request `lines` (blank lines skipped), run through `app`
    (`create_app`). `progress(done, total)` is called as answers arrive."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    seen: set[str] = set()
    requests = [_parse(i, line, seen) for i, line in enumerate(lines, 1) if line.strip()]
    limit = asyncio.Semaphore(concurrency)
    done = 0

    async def answer(client: httpx.AsyncClient, req: dict[str, Any]) -> dict[str, Any]:
        nonlocal done
        if "error" not in req:
            async with limit:
                r = await client.post(req["url"], json=req["body"])
            try:
                body = r.json()
            except ValueError:
                body = r.text
            req = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": req["custom_id"],
                   "response": {"status_code": r.status_code, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
                   "error": None}
        done += 1
        if progress is not None:
            progress(done, len(requests))
        return req

    async with app.router.lifespan_context(app):  # starts and stops the engine thread
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:
            return list(await asyncio.gather(*(answer(client, r) for r in requests)))
