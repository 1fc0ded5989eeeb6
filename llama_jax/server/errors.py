"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure:
validation, unknown routes and models, oversized bodies, overload and internal errors; under
/v1/messages (Anthropic's Messages API) in Anthropic's, `{"type": "error", "error": {"type", "message"}}`."""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Send

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 503: "server_error", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


ANTHROPIC_PREFIX = "/v1/messages"
_ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}


def anthropic_error(err: APIError) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def error_body(err: APIError, path: str = "") -> bytes:
    """The error as the API at `path` shapes it (Anthropic's under /v1/messages, else OpenAI's)."""
    if path.startswith(ANTHROPIC_PREFIX):
        body = anthropic_error(err)
    else:
        body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    # ASCII-only JSON: a message that quotes input can never fail to encode.
    return json.dumps(body).encode()


def error_response(err: APIError, path: str = "") -> Response:
    return Response(error_body(err, path), status_code=err.status, media_type="application/json")


async def send_error(send: Send, err: APIError, headers: Sequence[tuple[bytes, bytes]] = (), path: str = "") -> None:
    """Answer from ASGI middleware, before the app runs."""
    body = error_body(err, path)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _param(loc: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "user", "content", "str")` -> `"messages[0].content"`: pydantic's
    union-member and discriminator tags are dropped, leaving the request's own field path."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query") else loc)
    out = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        part = str(part)
        is_role_tag = i >= 2 and parts[i - 2] == "messages" and isinstance(parts[i - 1], int) and part in _ROLES
        is_type_tag = part in _TYPE_TAGS or part[:1].isupper() or any(c in part for c in "[]-'\"(")
        if not (is_role_tag or is_type_tag):
            out += f".{part}" if out else part
    return out or None


def _validation_message(e: dict[str, Any]) -> str:
    kind = e.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
    if kind == "missing" and tuple(e.get("loc", ())) == ("body",):
        return "the request body must be a JSON object"
    if kind == "extra_forbidden":
        return "unknown field (not part of the API)"
    msg = str(e.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        # Of a union's failed alternatives, the deepest error is the one that got furthest.
        first = max(errors, key=lambda e: len(e.get("loc", ())), default={})
        loc = tuple(first.get("loc", ()))
        param = None if first.get("type") == "json_invalid" else _param(loc)
        message = _validation_message(first)
        if param:
            message = f"{param}: {message}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
        return error_response(APIError(400, message, param=param), request.url.path)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            err = APIError(404, f"{request.method} {request.url.path}: no such route", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        elif exc.status_code == 400:  # FastAPI could not decode the body (not UTF-8 JSON)
            err = APIError(400, f"the request body could not be read as UTF-8 JSON ({exc.detail})")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        return error_response(err, request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(APIError(500, "internal server error", code="internal_error"), request.url.path)
