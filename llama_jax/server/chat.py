"""POST /v1/chat/completions: messages → chat format → engine → content and tool calls, whole
or streamed as OpenAI chunks.

tool_choice:
- "none": the tools are neither shown to the model nor parsed out of its output.
- "auto" (the default with tools): tools are rendered by the chat format; calls in the output
  are parsed and returned as `tool_calls` with finish_reason "tool_calls".
- "required": as auto, plus a system instruction to answer with a function call, and the output
  constrained (structured.py) to a JSON list of calls `[{"name": ..., "parameters": {...}}]` of
  the given tools, their parameters following each tool's schema (one call, not a list, with
  parallel_tool_calls=false).
- a named function: only that tool is rendered and parsed, plus a system instruction to call it,
  and the output constrained to one such call of it.
The tool constraint takes the place of response_format. parallel_tool_calls=false keeps only the
first call the model makes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, AsyncIterator

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from ..chat_format import TemplateKwargsError, tools_to_parse
from ..scheduler import TokenLogprob
from ..structured import StructuredOutput
from .completions import vllm_prompt_logprobs
from .errors import bad_request
from .generation import (
    ClientGone,
    ServerContext,
    chat_logprobs,
    events,
    sampling_params,
    sse,
    sse_response,
    truncate_prompt,
)
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageOut,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    NamedToolChoice,
    SystemMessage,
    ToolCallOut,
    ToolMessage,
    Usage,
    content_text,
    new_id,
    now,
)
from .worker import Submission


REQUIRED_INSTRUCTION = "Answer by calling one or more of the provided functions."
NAMED_INSTRUCTION = "Answer by calling the function `{name}`."


def dialog(body: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools to render, in OpenAI's dict form, after applying tool_choice."""
    messages: list[dict[str, Any]] = []
    for m in body.messages:
        if isinstance(m, SystemMessage):
            messages.append({"role": "system", "content": content_text(m.content)})
        elif isinstance(m, AssistantMessage):
            msg: dict[str, Any] = {"role": "assistant", "content": content_text(m.content) if m.content else None}
            if m.tool_calls:
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            messages.append(msg)
        elif isinstance(m, ToolMessage):
            messages.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": content_text(m.content)})
        else:
            messages.append({"role": "user", "content": content_text(m.content)})
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = body.tool_choice
    if tools is None or choice == "none":
        return messages, None
    if choice == "required":
        messages = _with_instruction(messages, REQUIRED_INSTRUCTION)
    elif isinstance(choice, NamedToolChoice):
        name = choice.function.name
        tools = [t for t in tools if t["function"]["name"] == name]
        messages = _with_instruction(messages, NAMED_INSTRUCTION.format(name=name))
    return messages, tools


def tool_call_constraint(body: ChatCompletionRequest, tools: list[dict[str, Any]] | None) -> StructuredOutput | None:
    """For tool_choice "required" or a named function: the output as JSON tool calls (see the
    module docstring); None otherwise. Unknown schema keywords in the tools' parameters are
    ignored rather than refused."""
    if not tools or body.tool_choice in (None, "none", "auto"):
        return None
    calls = [{
        "type": "object",
        "properties": {"name": {"const": t["function"]["name"]},
                       "parameters": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    parallel = body.tool_choice == "required" and body.parallel_tool_calls is not False
    schema = {"type": "array", "items": call, "minItems": 1} if parallel else call
    return StructuredOutput(json={**schema, "x-guidance": {"lenient": True}})


def dialog_param(error: ValueError) -> str:
    """The request field a chat format's error is about."""
    return "chat_template_kwargs" if isinstance(error, TemplateKwargsError) else "messages"


def _with_instruction(messages: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{instruction}".lstrip())
        return [first, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


@dataclasses.dataclass
class ChatJob:
    """A chat request queued on the engine: its prompt ids, the tools to parse out of the output
    (None: plain text), and its engine requests (one per choice)."""

    ids: list[int]
    tools: list[dict[str, Any]] | None
    sub: Submission
    adapter: str | int = 0  # ServerContext.check_model's


async def start_chat(ctx: ServerContext, body: ChatCompletionRequest) -> ChatJob:
    """Render, check and queue a chat request (shared with /v1/responses); raises APIError."""
    adapter = ctx.check_model(body.model)
    messages, tools = dialog(body)
    try:
        chat_format = ctx.llm.chat_format
    except ValueError as e:
        raise bad_request(f"this model has no chat format: {e}") from None
    template_kwargs = ctx.chat_template_kwargs(body.chat_template_kwargs)
    try:
        ids = await asyncio.to_thread(chat_format.encode_dialog, messages, tools,
                                      add_generation_prompt=body.generation_prompt,
                                      continue_final_message=body.continue_final_message,
                                      chat_template_kwargs=template_kwargs)
    except ValueError as e:
        raise bad_request(str(e), dialog_param(e)) from None
    ids = truncate_prompt(body, ids, ctx.max_seq_len)
    parsed = tools if body.tool_choice == "none" else tools_to_parse(tools, template_kwargs)
    samplings = sampling_params(body, len(ids), ctx.max_seq_len, prompt_param="messages",
                                logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0,
                                structured_output=await ctx.constraint(body, tool_call_constraint(body, tools)),
                                parse_tools=bool(parsed))
    return ChatJob(ids, parsed, ctx.submit([(ids, sp) for sp in samplings], adapter, body.priority), adapter)


async def create_chat_completion(ctx: ServerContext, body: ChatCompletionRequest, request: HTTPRequest) -> Response:
    from ..tool_calls import StreamingToolParser, parse_tool_calls

    job = await start_chat(ctx, body)
    ids, tools, sub = job.ids, job.tools, job.sub
    parallel = body.parallel_tool_calls is not False
    rid, created = new_id("chatcmpl"), now()

    if not body.stream:
        n = body.n
        texts = [""] * n
        lps: list[list[TokenLogprob]] = [[] for _ in range(n)]
        reasons = ["stop"] * n
        stops: list[str | int | None] = [None] * n
        counts = [0] * n
        tokens: list[list[int]] = [[] for _ in range(n)]
        cached = 0
        prompt_lps = None
        try:
            if body.prompt_logprobs is not None:
                prompt_lps = await vllm_prompt_logprobs(ctx, ids, body.prompt_logprobs, job.adapter)
            async for i, ev in events(sub, request):
                texts[i] += ev.text
                tokens[i] += ev.token_ids
                lps[i] += ev.logprobs or []
                counts[i] = ev.completion_tokens
                cached = ev.cached_tokens if i == 0 else cached
                reasons[i] = ev.finish_reason or reasons[i]
                stops[i] = ev.stop_reason if ev.finish_reason is not None else stops[i]
        except ClientGone:
            return Response(status_code=499)
        finally:
            sub.cancel()
        choices = []
        for i in range(n):
            content: str | None = texts[i]
            calls: list[dict[str, Any]] = []
            if tools:
                content, calls = parse_tool_calls(texts[i], tools)
                calls = calls if parallel else calls[:1]
            message = ChatMessageOut(
                content=(content or None) if calls else (content or ""),
                tool_calls=[ToolCallOut.model_validate(c) for c in calls] or None,
            )
            logprobs = ChoiceLogprobs(content=chat_logprobs(ctx, lps[i])) if body.logprobs else None
            choices.append(ChatChoice(index=i, message=message, logprobs=logprobs,
                                      finish_reason="tool_calls" if calls else reasons[i], stop_reason=stops[i],
                                      token_ids=tokens[i]))
        usage = Usage.of(len(ids), sum(counts), cached)
        out = ChatCompletion(id=rid, created=created, model=ctx.model_name, choices=choices, usage=usage,
                             prompt_logprobs=prompt_lps, prompt_token_ids=ids)
        return Response(body.dump(out), media_type="application/json")

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None, prompt_ids: list[int] | None = None) -> str:
        c = ChatCompletionChunk(id=rid, created=created, model=ctx.model_name, choices=choices, usage=usage,
                                prompt_token_ids=prompt_ids)
        return sse(body.dump(c, chunk=True))

    async def stream() -> AsyncIterator[str]:
        parsers = [StreamingToolParser(tools) if tools else None for _ in range(body.n)]
        saw_call = [False] * body.n
        counts = [0] * body.n
        cached = 0

        def live() -> Usage | None:
            return Usage.of(len(ids), sum(counts), cached) if body.continuous_usage else None

        for i in range(body.n):
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))], live(),
                        ids if i == 0 else None)
        async for i, ev in events(sub, request):
            counts[i] = ev.completion_tokens
            cached = ev.cached_tokens if i == 0 else cached
            parser = parsers[i]
            deltas: list[dict[str, Any]] = []
            if ev.text:
                deltas = parser.feed(ev.text) if parser else [{"content": ev.text}]
            if ev.finish_reason is not None and parser:
                deltas += parser.finish()
            if not parallel:
                deltas = first_call_only(deltas)
            logprobs = ChoiceLogprobs(content=chat_logprobs(ctx, ev.logprobs)) if ev.logprobs else None
            token_ids = list(ev.token_ids) if body.return_token_ids and ev.token_ids else None
            if (logprobs or token_ids) and not deltas:
                deltas = [{}]
            for d in deltas:  # this step's logprobs and token ids go with its first chunk
                saw_call[i] = saw_call[i] or bool(d.get("tool_calls"))
                yield chunk([ChunkChoice(index=i, delta=Delta.model_validate(d), logprobs=logprobs,
                                         token_ids=token_ids)], live())
                logprobs = token_ids = None
            if ev.finish_reason is not None:
                reason = "tool_calls" if saw_call[i] else ev.finish_reason
                yield chunk([ChunkChoice(index=i, delta=Delta(), finish_reason=reason, stop_reason=ev.stop_reason)],
                            live())
        if body.include_usage:
            yield chunk([], Usage.of(len(ids), sum(counts), cached))

    return sse_response(stream(), sub, "chat")


def first_call_only(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed deltas without the tool calls after the first (parallel tool calls turned off)."""
    out = []
    for d in deltas:
        if "tool_calls" in d:
            calls = [c for c in d["tool_calls"] if c.get("index", 0) == 0]
            if not calls:
                continue
            d = dict(d, tool_calls=calls)
        out.append(d)
    return out
