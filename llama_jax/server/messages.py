"""POST /v1/messages: Anthropic's Messages API, over the chat path (as vLLM's and llama.cpp's
servers offer it, for clients built on Anthropic's SDK).

A request becomes a chat request (`to_chat`): `system` a system message, text blocks message
text, an assistant's `tool_use` blocks its tool calls, a user's `tool_result` blocks tool
messages, `tools` function tools, `tool_choice` auto/any/tool/none the chat's
auto/required/named/none, `stop_sequences` stop strings, `output_config.format` a JSON schema
response format; a final assistant message is the start of the answer, which the model goes on
writing (Anthropic's prefill: continue_final_message). It then runs through the same rendering,
checks, constraints and engine as /v1/chat/completions (`chat.start_chat`). The reply is a
message with a text block and a tool_use block per call, its `stop_reason` end_turn, max_tokens,
stop_sequence or tool_use; streamed, as Anthropic's events (message_start, content_block_start,
content_block_delta, content_block_stop, message_delta, message_stop). Errors have Anthropic's
shape (errors.py). `thinking` is accepted and ignored (Llama 3.1 answers without a thinking
phase); images, documents and server tools are refused. POST /v1/messages/count_tokens counts a
request's prompt.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Annotated, Any, AsyncIterator, Literal

from pydantic import Field, StrictBool, StrictInt, field_validator, model_validator
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from .chat import dialog, first_call_only, start_chat
from .errors import APIError, anthropic_error, bad_request
from .generation import ClientGone, ServerContext, events, sse_response
from .protocol import (
    ChatCompletionRequest,
    FunctionName,
    Number,
    Text,
    _Input,
    _no_surrogates,
    check_function_names,
)

_BLOCKS = ("text", "tool_use", "tool_result")


class TextBlock(_Input):
    type: Literal["text"]
    text: Text
    cache_control: dict[str, Any] | None = None  # prompt caching is automatic here (prefix reuse)
    citations: list[Any] | None = None


class ToolUseBlock(_Input):
    type: Literal["tool_use"]
    id: Text
    name: FunctionName
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(_Input):
    type: Literal["tool_result"]
    tool_use_id: Text
    content: Text | list[TextBlock] | None = None
    is_error: StrictBool | None = None
    cache_control: dict[str, Any] | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class InputMessage(_Input):
    role: Literal["user", "assistant"]
    content: Text | list[Block]


class Tool(_Input):
    name: FunctionName
    input_schema: dict[str, Any]
    description: Text | None = None
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None
    strict: StrictBool | None = None
    input_examples: list[dict[str, Any]] | None = None


class ToolChoice(_Input):
    type: Literal["auto", "any", "tool", "none"]
    name: FunctionName | None = None
    disable_parallel_tool_use: StrictBool | None = None

    @model_validator(mode="after")
    def _named(self) -> "ToolChoice":
        if (self.type == "tool") != (self.name is not None):
            raise ValueError('a name goes with type "tool", and only with it')
        return self


class OutputFormat(_Input):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Input):
    format: OutputFormat | None = None
    effort: Text | None = None  # a reasoning hint: no effect here


class _MessagesBody(_Input):
    """What /v1/messages and /v1/messages/count_tokens share."""

    model: Text
    messages: Annotated[list[InputMessage], Field(min_length=1)]
    system: Text | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    thinking: dict[str, Any] | None = None  # accepted, without effect: no thinking phase here
    # Accepted and without effect here: caching, routing and tracing hints.
    cache_control: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    service_tier: Text | None = None
    inference_geo: Text | None = None
    speed: Text | None = None
    diagnostics: dict[str, Any] | None = None
    context_management: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        """Valid text only, and blocks this server can read (a clear 400 for the others)."""
        data = _no_surrogates(data)
        messages = data.get("messages") if isinstance(data, dict) else None
        for i, m in enumerate(messages if isinstance(messages, list) else []):
            content = m.get("content") if isinstance(m, dict) else None
            for j, block in enumerate(content if isinstance(content, list) else []):
                kind = block.get("type") if isinstance(block, dict) else None
                if kind not in _BLOCKS:
                    raise ValueError(f"messages[{i}].content[{j}] is of type {kind!r}: this server reads "
                                     f"{', '.join(_BLOCKS)} blocks only")
        tools = data.get("tools") if isinstance(data, dict) else None
        for i, tool in enumerate(tools if isinstance(tools, list) else []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind not in (None, "custom"):
                raise ValueError(f"tools[{i}] is of type {kind!r}: this server runs custom tools only")
        return data

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        check_function_names([t.name for t in tools or []])
        return tools


class MessagesRequest(_MessagesBody):
    max_tokens: Annotated[StrictInt, Field(ge=1)]
    stop_sequences: list[Text] | None = None
    stream: StrictBool = False
    temperature: Annotated[Number, Field(ge=0, le=1)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    container: Any = None
    mcp_servers: list[Any] | None = None

    @field_validator("container", "mcp_servers")
    @classmethod
    def _none(cls, value: Any) -> Any:
        if value:
            raise ValueError("not supported by this server")
        return value


class CountTokensRequest(_MessagesBody):
    pass


def _text(content: str | list[TextBlock] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "\n".join(b.text for b in content)


def to_chat(body: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    """The chat request that renders and samples as `body` asks."""
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system)})
    for m in body.messages:
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        if m.role == "assistant":
            said = "".join(b.text for b in blocks if isinstance(b, TextBlock))
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                     for b in blocks if isinstance(b, ToolUseBlock)]
            messages.append({"role": "assistant", "content": said or None, **({"tool_calls": calls} if calls else {})})
            continue
        text: list[str] = []
        for b in blocks:  # tool results and text, in their order
            if isinstance(b, ToolResultBlock):
                if text:
                    messages.append({"role": "user", "content": "\n".join(text)})
                    text = []
                messages.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _text(b.content)})
            elif isinstance(b, TextBlock):
                text.append(b.text)
            else:
                raise bad_request("tool_use blocks go in assistant messages", "messages")
        if text:
            messages.append({"role": "user", "content": "\n".join(text)})
    last = body.messages[-1]
    prefill = last.role == "assistant"
    if prefill and messages[-1].get("tool_calls"):
        raise bad_request("the last message is an assistant's tool call: send its tool_result first", "messages")
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "continue_final_message": prefill,
                            "add_generation_prompt": not prefill}
    if isinstance(body, MessagesRequest):
        chat.update(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    stop=body.stop_sequences)
    if body.tools:
        chat["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.input_schema}} for t in body.tools]
    choice = body.tool_choice
    if choice is not None and body.tools:
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(
            choice.type, {"type": "function", "function": {"name": choice.name}})
        if choice.disable_parallel_tool_use:
            chat["parallel_tool_calls"] = False
    fmt = body.output_config.format if body.output_config else None
    if fmt is not None:
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValueError as e:  # what the chat request checks beyond this one's fields (e.g. stop strings)
        raise bad_request(str(e).split("\n", 2)[-1].strip(), "messages") from None


async def count_tokens(ctx: ServerContext, body: CountTokensRequest) -> dict[str, int]:
    ctx.check_model(body.model)
    chat = to_chat(body)
    messages, tools = dialog(chat)
    try:
        ids = await asyncio.to_thread(ctx.llm.chat_format.encode_dialog, messages, tools,
                                      add_generation_prompt=chat.generation_prompt,
                                      continue_final_message=chat.continue_final_message,
                                      chat_template_kwargs=ctx.chat_template_kwargs(None))
    except ValueError as e:
        raise bad_request(str(e), "messages") from None
    return {"input_tokens": len(ids)}


def _stop(finish: str, stop_reason: str | int | None, called: bool) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a chat ending."""
    if called:
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call["id"].replace("call_", "toolu_", 1), "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"])}


def _usage(prompt: int, output: int, cached: int) -> dict[str, Any]:
    return {"input_tokens": prompt - cached, "output_tokens": output, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0}


async def create_message(ctx: ServerContext, body: MessagesRequest, request: HTTPRequest) -> Response:
    from ..tool_calls import StreamingToolParser, parse_tool_calls

    job = await start_chat(ctx, to_chat(body))
    one_call = body.tool_choice is not None and bool(body.tool_choice.disable_parallel_tool_use)
    mid = f"msg_{uuid.uuid4().hex}"
    message = {"id": mid, "type": "message", "role": "assistant", "model": ctx.model_name, "content": [],
               "stop_reason": None, "stop_sequence": None}

    if not body.stream:
        text, finish, stop_reason, count, cached = "", "stop", None, 0, 0
        try:
            async for _, ev in events(job.sub, request):
                text += ev.text
                if ev.finish_reason is not None:
                    finish, stop_reason = ev.finish_reason, ev.stop_reason
                    count, cached = ev.completion_tokens, ev.cached_tokens
        except ClientGone:
            return Response(status_code=499)
        finally:
            job.sub.cancel()
        content, calls = parse_tool_calls(text, job.tools) if job.tools else (text, [])
        calls = calls[:1] if one_call else calls
        blocks = ([{"type": "text", "text": content}] if content else []) + [_tool_use(c) for c in calls]
        reason, sequence = _stop(finish, stop_reason, bool(calls))
        message.update(content=blocks, stop_reason=reason, stop_sequence=sequence,
                       usage=_usage(len(job.ids), count, cached))
        return Response(json.dumps(message), media_type="application/json")

    def event(kind: str, data: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

    async def stream() -> AsyncIterator[str]:
        parser = StreamingToolParser(job.tools) if job.tools else None
        yield event("message_start", {"message": {**message, "usage": _usage(len(job.ids), 0, 0)}})
        index, text_open, called = -1, False, False
        finish, stop_reason, count, cached = "stop", None, 0, 0
        async for _, ev in events(job.sub, request):
            deltas = (parser.feed(ev.text) if parser else [{"content": ev.text}]) if ev.text else []
            if ev.finish_reason is not None:
                deltas += parser.finish() if parser else []
                finish, stop_reason = ev.finish_reason, ev.stop_reason
                count, cached = ev.completion_tokens, ev.cached_tokens
            for d in (first_call_only(deltas) if one_call else deltas):
                if "content" in d:
                    if not text_open:
                        index, text_open = index + 1, True
                        yield event("content_block_start", {"index": index,
                                                            "content_block": {"type": "text", "text": ""}})
                    yield event("content_block_delta", {"index": index,
                                                        "delta": {"type": "text_delta", "text": d["content"]}})
                    continue
                (call,) = d["tool_calls"]
                if "id" in call:  # a call begins: its name now, its arguments in the next delta
                    if text_open:
                        yield event("content_block_stop", {"index": index})
                        text_open = False
                    index, called = index + 1, True
                    block = {"type": "tool_use", "id": call["id"].replace("call_", "toolu_", 1),
                             "name": call["function"]["name"], "input": {}}
                    yield event("content_block_start", {"index": index, "content_block": block})
                else:
                    yield event("content_block_delta", {"index": index, "delta": {
                        "type": "input_json_delta", "partial_json": call["function"]["arguments"]}})
                    yield event("content_block_stop", {"index": index})
        if text_open:
            yield event("content_block_stop", {"index": index})
        reason, sequence = _stop(finish, stop_reason, called)
        yield event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                      "usage": _usage(len(job.ids), count, cached)})
        yield event("message_stop", {})

    def error_event(err: APIError) -> str:
        return f"event: error\ndata: {json.dumps(anthropic_error(err))}\n\n"

    return sse_response(stream(), job.sub, "messages", done=False, error_event=error_event)
