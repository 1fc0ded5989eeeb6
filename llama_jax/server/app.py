"""The FastAPI application: routes, the body-size limit, request metrics and error mapping.

`create_app(llm)` gives an ASGI app whose lifespan starts and stops the engine thread. The app
owns `llm.scheduler` while it runs: do not call `llm.generate` on the same LLM meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Sequence

from fastapi import FastAPI, Query, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors
from .chat import create_chat_completion
from .completions import create_completion
from .errors import APIError, bad_request, send_error
from .generation import SSE_HEADERS, ServerContext
from .messages import CountTokensRequest, MessagesRequest, count_tokens, create_message
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoraAdapterRequest,
)
from .responses import ResponsesRequest, ResponseStore, create_response
from .tokens import detokenize, tokenize
from .worker import EngineWorker

DEFAULT_MAX_BODY_BYTES = 4 << 20
# Longer than a large model's first compilation of a new shape (minutes), which runs in a step.
DEFAULT_STALL_TIMEOUT_S = 600.0


def default_model_name(llm: Any) -> str:
    path = getattr(llm, "path", None)
    return path.name if path is not None else "llama-jax"


def create_app(
    llm: Any,
    *,
    model_name: str | None = None,
    max_queue: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_keys: Sequence[str] = (),
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT_S,
    health_checks: Sequence[Callable[[], str | None]] = (),
    default_chat_template_kwargs: dict[str, Any] | None = None,
    runtime_lora_updating: bool = False,
) -> FastAPI:
    """An OpenAI-compatible app serving `llm` (a `llama_jax.api.LLM` with a tokenizer).

    `max_queue`: requests that may wait for a slot (beyond it: 503); None keeps the scheduler's.
    `max_body_bytes`: larger request bodies get 413.
    `api_keys`: when given, every route but /health and /metrics needs `Authorization: Bearer KEY`
    with one of them (401 otherwise).
    `stall_timeout`: /health answers 503 while one engine step has run longer than this many
    seconds (a hung device or collective; None: never), so a supervisor can restart the server.
    `health_checks`: more checks for /health, each returning what is wrong or None (e.g.
    `lockstep.Leader.problem`).
    `default_chat_template_kwargs`: chat template variables for every chat; a request's own
    `chat_template_kwargs` win (vLLM's --default-chat-template-kwargs).
    `runtime_lora_updating`: serve vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter,
    which read adapter directories named by the client on the server's filesystem (into the
    empty adapter slots of `load(max_loras=N)`).
    """
    if any(not key for key in api_keys):
        raise ValueError("an API key is empty")
    if stall_timeout is not None and stall_timeout <= 0:
        raise ValueError(f"stall_timeout must be positive (or None), got {stall_timeout}")
    if llm.scheduler is None:
        raise ValueError("the LLM has no tokenizer, so it cannot be served")
    if max_queue is not None:
        llm.scheduler.max_queue = max_queue
    with contextlib.suppress(ValueError):  # built now rather than on the first request; absent: chat gets a 400
        _ = llm.chat_format
    metrics = ServerMetrics(llm.scheduler, llm.engine.max_slots)
    worker = EngineWorker(llm.scheduler, observe=metrics.observe)
    ctx = ServerContext(llm=llm, worker=worker, metrics=metrics, model_name=model_name or default_model_name(llm),
                        created=int(time.time()),
                        default_chat_template_kwargs=dict(default_chat_template_kwargs or {}))
    if ctx.model_name in ctx.adapter_names:
        raise ValueError(f"the model name {ctx.model_name!r} is also an adapter's name")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="llama-jax", summary="OpenAI-compatible Llama inference", lifespan=lifespan)
    app.state.ctx = ctx
    errors.install(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    stored = ResponseStore()

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await create_response(ctx, body, request, stored)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, stream: bool = False,
                           starting_after: Annotated[int | None, Query(ge=0)] = None) -> Response:
        if stream:  # a streamed background response's events, from after `starting_after` on
            return StreamingResponse(stored.follow(response_id, starting_after), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return JSONResponse(stored.response(response_id))

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(
        response_id: str, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20,
        order: Literal["asc", "desc"] = "desc", include: Annotated[list[str] | None, Query()] = None,
    ) -> JSONResponse:
        # `include` asks for extra data (image URLs, logprobs) that text-only items do not have.
        return JSONResponse(stored.input_items(response_id, after=after, limit=limit, order=order))

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str) -> JSONResponse:
        return JSONResponse(await stored.cancel(response_id))

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> JSONResponse:
        return JSONResponse(stored.delete(response_id))

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request) -> Response:
        return await create_message(ctx, body, request)

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(body: CountTokensRequest) -> JSONResponse:
        return JSONResponse(await count_tokens(ctx, body))

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> TokenizeResponse:
        return await tokenize(ctx, body)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        return await detokenize(ctx, body)

    def card(adapter: str | int = 0) -> ModelCard:
        if adapter == 0:
            return ModelCard(id=ctx.model_name, created=ctx.created, max_model_len=ctx.max_seq_len)
        return ModelCard(id=str(adapter), created=ctx.created, max_model_len=ctx.max_seq_len, parent=ctx.model_name)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card(0), *map(card, ctx.adapter_names)])

    if runtime_lora_updating:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoraAdapterRequest) -> PlainTextResponse:
            name = body.lora_name
            if name == ctx.model_name:
                raise bad_request(f"{name!r} is the base model's name", "lora_name")
            if name in ctx.adapter_names and not body.load_inplace:
                raise bad_request(f"The LoRA adapter {name!r} has already been loaded "
                                  "(unload it first, or set load_inplace)", "lora_name")
            try:  # read off the event loop and the engine thread; written between two engine steps
                adapters, config = await asyncio.to_thread(llm.read_adapter, body.lora_path)
                await asyncio.wrap_future(worker.call(
                    lambda: llm.install_adapter(name, adapters, config, replace=body.load_inplace)))
            except (ValueError, OSError) as e:
                raise bad_request(str(e), "lora_path") from None
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> PlainTextResponse:
            try:
                llm.unload_adapter(body.lora_name)
            except ValueError:
                raise APIError(404, f"The LoRA adapter {body.lora_name!r} cannot be found", param="lora_name",
                               code="model_not_found") from None
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> ModelCard:
        return card(ctx.check_model(model))

    @app.get("/health")
    async def health() -> Response:
        if not worker.alive:
            raise APIError(503, "the engine thread is not running", code="engine_down")
        if worker.last_error is not None:
            raise APIError(503, "the engine's last step failed", code="engine_error")
        busy = worker.busy_for
        if stall_timeout is not None and busy > stall_timeout:
            raise APIError(503, f"an engine step has run for {busy:.0f} s (over {stall_timeout:g} s)",
                           code="engine_stalled")
        for check in health_checks:
            problem = check()
            if problem is not None:
                raise APIError(503, problem, code="engine_down")
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> JSONResponse:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as package_version

        try:
            return JSONResponse({"version": package_version("llama-jax")})
        except PackageNotFoundError:  # run from a checkout that was not installed
            return JSONResponse({"version": "unknown"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    known = {route.path for route in app.routes}  # type: ignore[attr-defined]
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_keys:  # outside BodyLimit: a request without a key is refused before its body is read
        app.add_middleware(RequireKey, keys=api_keys, open_paths={"/health", "/metrics"})
    app.add_middleware(CountRequests, metrics=metrics, known=known)
    return app


class RequireKey:
    """Answers 401 unless the request carries `Authorization: Bearer KEY` (or, as Anthropic's
    clients send it, `x-api-key: KEY`) with one of `keys` (compared in constant time);
    `open_paths` need none (probes, Prometheus)."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], open_paths: set[str]):
        self.app = app
        self.keys = [key.strip().encode() for key in keys]
        self.open_paths = open_paths

    def _allowed(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            token = headers.get(b"x-api-key", b"")
            if not token:
                return False
        token = token.strip()
        # Every key is compared (a list, not a short-circuiting generator): the time taken does not
        # depend on which key, if any, matched.
        return any([hmac.compare_digest(token, key) for key in self.keys])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._allowed(scope):
            return await self.app(scope, receive, send)
        await send_error(send, APIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>' "
                                             "(or 'x-api-key: <key>')", code="invalid_api_key"),
                         headers=[(b"www-authenticate", b"Bearer")], path=scope["path"])


class BodyLimit:
    """Reads the whole request body before the app runs, answering 413 as soon as it is over the
    limit (by Content-Length or while reading), then replays it to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await send_error(send, APIError(400, "invalid Content-Length header"), path=scope["path"])
            if int(length) > self.max_bytes:
                return await send_error(send, self._too_large(), path=scope["path"])
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await send_error(send, self._too_large(), path=scope["path"])
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)


class CountRequests:
    """Counts HTTP requests by endpoint (route path, or "other") and status code."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, known: set[str]):
        self.app = app
        self.metrics = metrics
        self.known = known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        endpoint = path if path in self.known else "other"
        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
