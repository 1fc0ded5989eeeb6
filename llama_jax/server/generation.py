"""What the two generation endpoints share: the server context, sampling parameters from a
request, submitting to the engine thread and reading events back while watching the client."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Callable, Sequence

from starlette.requests import Request as HTTPRequest
from starlette.responses import StreamingResponse

from ..sampling import SamplingParams
from ..scheduler import Event, QueueFull, TokenLogprob
from ..structured import StructuredOutput
from ..tokenizer import Tokenizer
from .errors import APIError, bad_request, error_body
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, TokenLogprobOut, TopLogprob
from .worker import EngineFailure, EngineWorker, Submission

log = logging.getLogger(__name__)

# How often a request that is waiting on the engine checks whether its client is still there.
DISCONNECT_POLL_S = 0.25
# OpenAI reports log-probabilities of impossible tokens as -9999 rather than -inf (not JSON).
MIN_LOGPROB = -9999.0


class ClientGone(Exception):
    """The HTTP client disconnected before the response was complete."""


@dataclasses.dataclass
class ServerContext:
    llm: Any  # llama_jax.api.LLM, or an object with the same attributes (tests)
    worker: EngineWorker
    metrics: ServerMetrics
    model_name: str
    created: int
    default_chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def chat_template_kwargs(self, given: dict[str, Any] | None) -> dict[str, Any] | None:
        """A request's chat template variables over the server's defaults."""
        merged = {**self.default_chat_template_kwargs, **(given or {})}
        return merged or None

    @property
    def tokenizer(self) -> Tokenizer:
        return self.llm.tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.llm.max_seq_len

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The LoRA adapters served beside the base model, as models of their own."""
        return self.llm.adapter_names

    def check_model(self, name: str) -> str | int:
        """The adapter a request's `model` names: 0 for the base model, else the adapter's name,
        resolved again when the request is queued (adapters may be loaded and unloaded between:
        see submit); a name not served is a 404."""
        if name == self.model_name:
            return 0
        if name in self.adapter_names:
            return name
        raise self._unknown_model(name)

    def _unknown_model(self, name: str) -> APIError:
        served = ", ".join(repr(m) for m in (self.model_name, *self.adapter_names))
        return APIError(404, f"The model {name!r} does not exist; this server serves {served}",
                        param="model", code="model_not_found")

    def submit(self, jobs: Sequence[tuple[list[int], SamplingParams]], adapter: str | int = 0,
               priority: int = 0) -> Submission:
        limit = self.worker.scheduler.max_queue
        if priority and self.worker.scheduler.policy != "priority":
            raise bad_request("priority scheduling is not enabled (serve.py --scheduling-policy priority)", "priority")
        if len(jobs) > limit:  # could never be queued, however idle the server
            raise bad_request(f"the request asks for {len(jobs)} sequences (prompts x n); "
                              f"this server queues at most {limit}", "n")
        try:
            # The name is resolved and the requests queued under the adapter lock: an adapter
            # unloaded meanwhile is a 404, and its slot is not refilled under these requests.
            with self.llm.adapter_lock:
                try:
                    slot, waiting = self.llm.resolve_adapter(adapter)
                except ValueError:
                    raise self._unknown_model(str(adapter)) from None
                sub = self.worker.submit(jobs, asyncio.get_running_loop(), slot, waiting, priority)
        except QueueFull as e:
            raise APIError(503, f"the server is overloaded ({e}); retry later", code="overloaded") from None
        except ValueError as e:
            raise bad_request(str(e)) from None
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in jobs))
        return sub

    async def constraint(self, body: ChatCompletionRequest | CompletionRequest,
                         tool_calls: StructuredOutput | None = None) -> StructuredOutput | None:
        """The request's structured-output constraint (`tool_calls`, the tool_choice's, in place of
        the body's), its grammar compiled (off the event loop, and cached for the scheduler), or
        a 400 naming the field if it does not compile."""
        if tool_calls is not None:
            constraint, field = tool_calls, "tools"
        else:
            try:
                constraint, field = body.constraint()
            except ValueError as e:
                field = "structured_outputs" if body.structured_outputs else "response_format"
                raise bad_request(str(e), field) from None
        if constraint is not None:
            try:
                await asyncio.to_thread(self.worker.scheduler.grammars.matcher, constraint)
            except ValueError as e:
                raise bad_request(str(e), field) from None
        return constraint

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def truncate_prompt(body: ChatCompletionRequest | CompletionRequest, ids: list[int], max_seq_len: int) -> list[int]:
    """The prompt's last `truncate_prompt_tokens` tokens (all of them when that is unset)."""
    keep = body.truncate_prompt_tokens
    if keep is None:
        return ids
    if keep == -1:
        keep = max_seq_len
    elif keep > max_seq_len:
        raise bad_request(f"truncate_prompt_tokens is {keep}, more than the context holds ({max_seq_len})",
                          "truncate_prompt_tokens")
    return ids[-keep:]


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest, prompt_len: int, max_seq_len: int, *, prompt_param: str,
    logprobs: bool, top_logprobs: int, structured_output: StructuredOutput | None = None, parse_tools: bool = False,
) -> list[SamplingParams]:
    """One SamplingParams per choice; choice i of a seeded request uses seed + i. `parse_tools`:
    tool calls are parsed from the text, so special tokens stay in it (the parser reads its
    markers and drops them from the content) whatever skip_special_tokens says."""
    room = max_seq_len - prompt_len
    if room <= 0:
        raise bad_request(
            f"the prompt has {prompt_len} tokens but the context holds {max_seq_len} tokens (prompt + output)",
            prompt_param)
    limit = body.output_limit
    if limit is None:
        limit = min(room, body.DEFAULT_MAX_TOKENS or room)
    elif limit > room:
        field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        raise bad_request(
            f"{field} is {limit} but the prompt has {prompt_len} tokens and the context holds {max_seq_len} "
            f"(prompt + output): at most {room} tokens can be generated", field)
    try:
        base = SamplingParams(
            max_tokens=limit,
            # OpenAI's defaults, not the instruct models' (0.6 / 0.9): clients expect them.
            temperature=1.0 if body.temperature is None else float(body.temperature),
            # top_p=0 (allowed by OpenAI) keeps only the most likely token, as any tiny top_p does.
            top_p=1.0 if body.top_p is None else max(float(body.top_p), 1e-6),
            top_k=body.top_k or 0,
            min_p=float(body.min_p or 0.0),
            repetition_penalty=float(body.repetition_penalty or 1.0),
            presence_penalty=float(body.presence_penalty or 0.0),
            frequency_penalty=float(body.frequency_penalty or 0.0),
            stop=tuple(body.stop or ()),
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens and not parse_tools,
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            logit_bias={int(k): float(v) for k, v in (body.logit_bias or {}).items()},
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            structured_output=structured_output,
        )
    except ValueError as e:  # SamplingParams' messages start with the field's name
        field = str(e).split(" ", 1)[0]
        raise bad_request(str(e), field if field in type(body).model_fields else None) from None
    return [base.replace(seed=None if body.seed is None else body.seed + i) for i in range(body.n)]


async def events(sub: Submission, request: HTTPRequest | None) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) as the engine produces them, until every choice has finished.
    Raises ClientGone if the client (`request`; None: no client waits) disconnects and a 500
    APIError if the engine failed."""
    remaining = len(sub.requests)
    next_check = time.monotonic() + DISCONNECT_POLL_S
    while remaining:
        if request is not None and time.monotonic() >= next_check:
            if await request.is_disconnected():
                raise ClientGone()
            next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            item = sub.queue.get_nowait()
        except asyncio.QueueEmpty:
            try:
                item = await asyncio.wait_for(sub.queue.get(), max(next_check - time.monotonic(), 0.001))
            except TimeoutError:
                continue
        index, event = item
        if isinstance(event, EngineFailure):
            raise APIError(500, str(event), code="engine_error")
        if event.finish_reason is not None:
            remaining -= 1
        yield index, event


def chat_logprobs(ctx: ServerContext, lps: list[TokenLogprob]) -> list[TokenLogprobOut]:
    def top(tid: int, lp: float) -> TopLogprob:
        return TopLogprob(token=ctx.token_text(tid), logprob=max(lp, MIN_LOGPROB),
                          bytes=list(ctx.tokenizer.token_bytes(tid)))

    return [
        TokenLogprobOut(**top(lp.token_id, lp.logprob).model_dump(), top_logprobs=[top(t, v) for t, v in lp.top])
        for lp in lps
    ]


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: str) -> str:
    """One server-sent event, framed as OpenAI frames them."""
    return f"data: {data}\n\n"


def sse_response(chunks: AsyncIterator[str], sub: Submission, what: str, *, done: bool = True,
                 error_event: Callable[[APIError], str] | None = None) -> StreamingResponse:
    """Stream `chunks` as server-sent events, ending in `data: [DONE]` if `done`. A client that
    leaves ends the stream quietly; an error after the first event becomes an error event
    (`error_event`, default `sse_error`); the engine requests are cancelled however the stream ends."""
    error_event = error_event or sse_error

    async def framed() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield c
            if done:
                yield "data: [DONE]\n\n"
        except ClientGone:
            return
        except APIError as e:
            yield error_event(e)
        except Exception:
            log.exception("%s stream failed", what)
            yield error_event(APIError(500, "internal server error", code="internal_error"))
        finally:
            sub.cancel()

    return StreamingResponse(framed(), media_type="text/event-stream", headers=SSE_HEADERS)


def sse_error(err: APIError) -> str:
    """An error after the stream has started (the status is sent already): OpenAI's error object as an event."""
    return sse(error_body(err).decode())
