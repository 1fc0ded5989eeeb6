"""POST /v1/responses: OpenAI's Responses API, over the chat path.

A request (input items, instructions, function tools, text.format) becomes a chat request
(`to_chat`) and runs through the same rendering, checks, constraints and engine as
/v1/chat/completions (`chat.start_chat`). Its output becomes output items: a message with one
output_text part, then a function_call item per call parsed out of the text; streamed, as the
Responses API's events (response.created, response.output_item.added, response.output_text.delta,
..., response.completed or response.incomplete), each with its `event:` line and a sequence number.

Responses are stored unless `store` is false, in memory (the latest STORED_RESPONSES): a request
with `previous_response_id` continues that response's conversation (its input and output items;
not its instructions, as OpenAI does), GET/DELETE /v1/responses/{id} read and remove one, and
GET /v1/responses/{id}/input_items lists the items it was made from. A `background` request is
answered at once (status "queued"), generates with no client attached (GET shows its progress and
result), and POST /v1/responses/{id}/cancel stops it; with `stream` too, its events are kept, so
that the stream can be left and taken up again (GET /v1/responses/{id}?stream=true&starting_after=N).
`conversation` (the Conversations API) and stored prompts are refused. The request models live
here rather than in protocol.py because no other endpoint shares them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import uuid
from typing import Annotated, Any, AsyncIterator, Callable, Coroutine, Literal, NamedTuple

from pydantic import (
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response, StreamingResponse

from ..sampling import MAX_TOP_LOGPROBS
from .chat import start_chat
from .errors import APIError, bad_request
from .generation import SSE_HEADERS, ClientGone, ServerContext, chat_logprobs, events, sse_response
from .protocol import (
    ChatCompletionRequest,
    FunctionDef,
    FunctionName,
    JSONSchemaFormat,
    Number,
    Text,
    _Input,
    _no_surrogates,
    check_function_names,
    check_tool_choice,
    now,
)

LOGPROBS_INCLUDE = "message.output_text.logprobs"
STORED_RESPONSES = 1024  # kept in memory; the oldest go first

# ---- the request ----


class TextPart(_Input):
    """Text content of an input message; an assistant message sent back has output_text parts."""

    type: Literal["input_text", "output_text"]
    text: Text
    annotations: list[Any] | None = None  # present on output_text sent back: not used
    logprobs: list[Any] | None = None


def _text(content: Text | list[TextPart]) -> str:
    return content if isinstance(content, str) else "\n".join(p.text for p in content)


class MessageItem(_Input):
    type: Literal["message"]
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | list[TextPart]
    id: Text | None = None
    status: Text | None = None
    phase: Text | None = None


class FunctionCallItem(_Input):
    type: Literal["function_call"]
    call_id: Text
    name: FunctionName
    arguments: Text
    id: Text | None = None
    status: Text | None = None


class FunctionCallOutputItem(_Input):
    type: Literal["function_call_output"]
    call_id: Text
    output: Text | list[TextPart]
    id: Text | None = None
    status: Text | None = None


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem
InputItem = Annotated[Item, Field(discriminator="type")]


class FunctionTool(FunctionDef):
    type: Literal["function"]


class NamedFunctionChoice(_Input):
    type: Literal["function"]
    name: FunctionName


class TextFormat(_Input):
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[Text, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")] | None = None
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None  # the output always follows the schema

    @model_validator(mode="after")
    def _schema(self) -> "TextFormat":
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs a name and a schema")
        return self


class TextConfig(_Input):
    format: TextFormat | None = None
    verbosity: Text | None = None  # accepted: no effect on a Llama model


class ResponsesRequest(_Input):
    model: Text
    input: Text | Annotated[list[InputItem], Field(min_length=1)]
    instructions: Text | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    max_tool_calls: Annotated[StrictInt, Field(ge=1)] | None = None
    text: TextConfig | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    include: list[Text] | None = None  # "message.output_text.logprobs" adds logprobs; others have nothing to add
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: events are never padded
    truncation: Literal["auto", "disabled"] | None = None  # a prompt too long is a 400 either way
    store: StrictBool | None = None  # default true: kept for previous_response_id and GET
    previous_response_id: Text | None = None
    background: StrictBool | None = None  # answer at once (queued); GET shows progress, cancel stops it
    # Accepted and without effect here: routing and reasoning hints.
    metadata: dict[str, Text] | None = None
    user: Text | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    prompt_cache_retention: Text | None = None
    service_tier: Text | None = None
    reasoning: dict[str, Any] | None = None
    # Need the Conversations API or stored prompts: only absent or null passes.
    conversation: Any = None
    prompt: Any = None
    # vLLM-compatible sampling extensions (the openai client sends them through `extra_body`).
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0)] | None = None
    stop: Text | list[Text] | None = None

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        """Valid text only; an input message may leave out `"type": "message"`."""
        data = _no_surrogates(data)
        if isinstance(data, dict) and isinstance(data.get("input"), list):
            items = [dict(i, type="message") if isinstance(i, dict) and "type" not in i and "role" in i else i
                     for i in data["input"]]
            data = dict(data, input=items)
        return data

    @field_validator("input", mode="before")
    @classmethod
    def _text_only(cls, items: Any) -> Any:
        for i, item in enumerate(items if isinstance(items, list) else []):
            content = item.get("content") if isinstance(item, dict) else None
            for j, part in enumerate(content if isinstance(content, list) else []):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("input_text", "output_text"):
                    raise ValueError(f"input[{i}].content[{j}] is {kind!r}: this server takes text only "
                                     "(input_text, output_text)")
        return items

    @field_validator("tools", mode="before")
    @classmethod
    def _functions_only(cls, tools: Any) -> Any:
        for i, tool in enumerate(tools if isinstance(tools, list) else []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tools[{i}] is of type {kind!r}: this server runs function tools only")
        return tools

    @field_validator("conversation", "prompt")
    @classmethod
    def _not_stored(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError(f"{info.field_name} is not supported by this server; send the conversation in "
                             "input, or continue a stored response with previous_response_id")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[FunctionTool] | None) -> list[FunctionTool] | None:
        check_function_names([t.name for t in tools or []])
        return tools

    @field_validator("background")
    @classmethod
    def _background_is_stored(cls, background: bool | None, info: ValidationInfo) -> bool | None:
        if background and info.data.get("store") is False:
            raise ValueError("a background response is stored: store must not be false")
        return background

    @field_validator("tool_choice")
    @classmethod
    def _choice_in_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        named = choice.name if isinstance(choice, NamedFunctionChoice) else None
        check_tool_choice(choice, [t.name for t in info.data.get("tools") or []], named)
        return choice

    @property
    def wants_logprobs(self) -> bool:
        return self.top_logprobs is not None or LOGPROBS_INCLUDE in (self.include or [])

    @property
    def items(self) -> list[Item]:
        """The input as items (text is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(type="message", role="user", content=self.input)]
        return list(self.input)


class _Stored(NamedTuple):
    response: dict[str, Any]
    conversation: list[Item]  # the input items, then the output's
    inputs: int  # how many of them were the input


class EventLog:
    """The server-sent events of a streamed background response, kept for readers that come and
    go: event i has sequence number i."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.done = False
        self._changed = asyncio.Event()

    def append(self, event: str) -> None:
        self.events.append(event)
        self._wake()

    def close(self) -> None:
        self.done = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int | None = None) -> AsyncIterator[str]:
        """The events after sequence number `after` (None: all), then each new one as it comes,
        until the response has ended."""
        i = 0 if after is None else after + 1
        while True:
            changed = self._changed
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.done:
                return
            await changed.wait()


class ResponseStore:
    """Stored responses, the latest `size` of them: each one's response object and its whole
    conversation (the items of every request in its chain, and their outputs as input items)."""

    def __init__(self, size: int = STORED_RESPONSES):
        self.size = size
        self._entries: collections.OrderedDict[str, _Stored] = collections.OrderedDict()
        # Background responses still generating: their task and what stops their engine requests.
        self._running: dict[str, tuple[asyncio.Task, Callable[[], None]]] = {}
        self._stopped: set[str] = set()  # cancelled or deleted while generating: not put back
        self._logs: dict[str, EventLog] = {}  # streamed background responses' events

    def put(self, response: dict[str, Any], inputs: list[Item], outputs: list[Item]) -> None:
        """Keep `response`, made from the conversation `inputs` (items with ids: `with_id`), whose
        output items are `outputs`."""
        if response["id"] in self._stopped:
            return
        self._entries[response["id"]] = _Stored(response, inputs + outputs, len(inputs))
        while len(self._entries) > self.size:
            self._drop_log(self._entries.popitem(last=False)[0])

    def event_log(self, rid: str) -> EventLog:
        """A new log for the events of streamed background response `rid`."""
        self._logs[rid] = EventLog()
        return self._logs[rid]

    def _drop_log(self, rid: str) -> None:
        """Forget a response's events; the streams reading them end."""
        log = self._logs.pop(rid, None)
        if log is not None:
            log.close()

    def follow(self, rid: str, after: int | None) -> AsyncIterator[str]:
        """GET /v1/responses/{id}?stream=true: the events of a streamed background response
        after sequence number `after`, and the rest as they come."""
        self._get(rid)
        if rid not in self._logs:
            raise APIError(400, f"Response {rid!r} was not created with background=true and stream=true: "
                                "only those can be streamed again.", param="stream")
        return self._logs[rid].follow(after)

    def response(self, rid: str) -> dict[str, Any]:
        return self._get(rid).response

    def conversation(self, rid: str) -> list[Item]:
        """The conversation `previous_response_id` names (a 400 on that field if none, as OpenAI's)."""
        if rid not in self._entries:
            raise APIError(400, f"Previous response with id {rid!r} not found.", param="previous_response_id",
                           code="previous_response_not_found")
        if rid in self._running:
            raise APIError(400, f"Previous response with id {rid!r} is still in progress.",
                           param="previous_response_id")
        return self._entries[rid].conversation

    def run(self, rid: str, work: Coroutine[Any, Any, None], cleanup: Callable[[], None]) -> None:
        """Generate background response `rid` (already put, queued) with `work`, which puts its
        end; `cleanup` (cancelling its engine requests) runs after it, however it ends."""

        def done(_: asyncio.Task) -> None:
            self._running.pop(rid, None)
            self._stopped.discard(rid)
            if rid in self._logs:  # finished, failed or cancelled (even before it started): its streams end
                self._logs[rid].close()
            cleanup()

        task = asyncio.get_running_loop().create_task(work)
        self._running[rid] = (task, cleanup)
        task.add_done_callback(done)

    def _stop(self, rid: str) -> asyncio.Task | None:
        """Stop background response `rid` if it is generating: its engine requests at once (a task
        cancellation alone can be lost in Python 3.11's asyncio.wait_for), then its task."""
        if rid not in self._running:
            return None
        task, cleanup = self._running[rid]
        self.set_status(rid, "cancelled")
        self._stopped.add(rid)  # its status and entry stay as they are now
        cleanup()
        task.cancel()
        return task

    def set_status(self, rid: str, status: str, **fields: Any) -> None:
        if rid in self._entries and rid not in self._stopped:
            self._entries[rid].response.update(status=status, **fields)

    async def cancel(self, rid: str) -> dict[str, Any]:
        """POST /v1/responses/{id}/cancel: stop a background response; a finished one is returned
        as it is."""
        entry = self._get(rid)
        if not entry.response.get("background"):
            raise APIError(400, f"Response {rid!r} was not created with background=true: only background "
                                "responses can be cancelled.")
        task = self._stop(rid)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return self._get(rid).response

    def input_items(self, rid: str, *, after: str | None = None, limit: int = 20,
                    order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
        """GET /v1/responses/{id}/input_items: a page of the items the response was made from
        (those of its whole chain of previous responses too), newest first unless order="asc"."""
        entry = self._get(rid)
        items = [_listed(item) for item in entry.conversation[: entry.inputs]]
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise APIError(400, f"after: no input item {after!r} in response {rid!r}", param="after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    def delete(self, rid: str) -> dict[str, Any]:
        self._get(rid)
        self._stop(rid)
        del self._entries[rid]
        self._drop_log(rid)
        return {"id": rid, "object": "response", "deleted": True}

    def _get(self, rid: str) -> _Stored:
        if rid not in self._entries:
            raise APIError(404, f"No response with id {rid!r} (responses are kept in memory, the latest "
                                f"{self.size}; one created with store=false is not kept)", code="not_found")
        return self._entries[rid]


_ITEM_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def with_id(item: Item) -> Item:
    """`item`, given an id if it has none, as OpenAI's stored items have."""
    return item if item.id else item.model_copy(update={"id": _id(_ITEM_ID_PREFIX[item.type])})


def _listed(item: Item) -> dict[str, Any]:
    """A stored item as OpenAI lists it: text content as parts, a status."""
    if isinstance(item, MessageItem):
        kind = "output_text" if item.role == "assistant" else "input_text"
        parts = [TextPart(type=kind, text=item.content)] if isinstance(item.content, str) else item.content
        content = [{"type": p.type, "text": p.text, **({"annotations": []} if p.type == "output_text" else {})}
                   for p in parts]
        return {"id": item.id, "type": "message", "role": item.role, "content": content, "status": "completed"}
    if isinstance(item, FunctionCallItem):
        return {"id": item.id, "type": "function_call", "call_id": item.call_id, "name": item.name,
                "arguments": item.arguments, "status": "completed"}
    output = item.output if isinstance(item.output, str) else [p.model_dump(exclude_none=True) for p in item.output]
    return {"id": item.id, "type": "function_call_output", "call_id": item.call_id, "output": output,
            "status": "completed"}


def as_input(output: list[dict[str, Any]]) -> list[Item]:
    """Output items as the input items a client would send back."""
    items: list[Item] = []
    for item in output:
        if item["type"] == "message":
            parts = [TextPart(type="output_text", text=p["text"]) for p in item["content"]]
            items.append(MessageItem(type="message", role="assistant", content=parts, id=item["id"]))
        else:
            items.append(FunctionCallItem(type="function_call", call_id=item["call_id"], name=item["name"],
                                          arguments=item["arguments"], id=item["id"]))
    return items


# A chat request's field names, as this endpoint calls them (in error messages' `param`).
_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
           "response_format": "text.format"}


def to_chat(body: ResponsesRequest, items: list[Item] | None = None) -> ChatCompletionRequest:
    """The chat request that renders and samples as `body` asks, over `items` (default: its input)."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    for item in body.items if items is None else items:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # the calls of one assistant turn
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    chat: dict[str, Any] = {
        "model": body.model, "messages": messages, "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "parallel_tool_calls": body.parallel_tool_calls,
        "seed": body.seed, "top_k": body.top_k, "min_p": body.min_p, "repetition_penalty": body.repetition_penalty,
        "stop": body.stop,
    }
    if body.tools:
        chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in body.tools]
    if isinstance(body.tool_choice, NamedFunctionChoice):
        chat["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    else:
        chat["tool_choice"] = body.tool_choice
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": JSONSchemaFormat.model_validate(
            {"name": fmt.name, "description": fmt.description, "schema": fmt.schema_, "strict": fmt.strict})}
    if body.wants_logprobs:
        chat.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValueError as e:  # what the chat request checks beyond this one's fields
        raise bad_request(str(e).split("\n", 2)[-1].strip(), "input") from None


# ---- the response ----


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Output:
    """Output items built from chat deltas ({"content"} and {"tool_calls"}, as
    StreamingToolParser gives them), with the stream events that build them."""

    def __init__(self, max_calls: int | None):
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the item still being written
        self._calls = 0
        self._max_calls = max_calls
        self._skipping = False  # the current call is past max_calls

    def add(self, delta: dict[str, Any], logprobs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        if "content" in delta:
            out = [] if self._is("message") else [*self._close(), *self._start_message()]
            part = self._open["content"][0]
            part["text"] += delta["content"]
            part["logprobs"] += logprobs
            return out + [("response.output_text.delta", {**self._where(), "content_index": 0,
                                                          "delta": delta["content"], "logprobs": logprobs})]
        call = delta["tool_calls"][0]
        if "id" in call:  # a new call: its name, then its arguments in a delta of their own
            out = self._close()
            self._skipping = self._max_calls is not None and self._calls >= self._max_calls
            if self._skipping:
                return out
            self._calls += 1
            self._open = {"id": _id("fc"), "type": "function_call", "status": "in_progress", "call_id": call["id"],
                          "name": call["function"]["name"], "arguments": ""}
            self.items.append(self._open)
            return out + [("response.output_item.added", {"output_index": len(self.items) - 1, "item": dict(self._open)})]
        if self._skipping:
            return []
        args = call["function"]["arguments"]
        self._open["arguments"] += args
        return [("response.function_call_arguments.delta", {**self._where(), "delta": args})]

    def finish(self, incomplete: bool) -> list[tuple[str, dict[str, Any]]]:
        if not self.items:  # the answer was empty: still one message, as OpenAI returns
            out = self._start_message()
        else:
            out = []
        return out + self._close(incomplete)

    def _is(self, kind: str) -> bool:
        return self._open is not None and self._open["type"] == kind

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def _start_message(self) -> list[tuple[str, dict[str, Any]]]:
        self._open = {"id": _id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                      "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
        self.items.append(self._open)
        added = dict(self._open, content=[])
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [("response.output_item.added", {"output_index": len(self.items) - 1, "item": added}),
                ("response.content_part.added", {**self._where(), "content_index": 0, "part": part})]

    def _close(self, incomplete: bool = False) -> list[tuple[str, dict[str, Any]]]:
        item, self._open = self._open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self.items.index(item)}
        item["status"] = "incomplete" if incomplete and item["type"] == "message" else "completed"
        if item["type"] == "message":
            part = item["content"][0]
            out = [("response.output_text.done", {**where, "content_index": 0, "text": part["text"],
                                                  "logprobs": part["logprobs"]}),
                   ("response.content_part.done", {**where, "content_index": 0, "part": part})]
        else:
            out = [("response.function_call_arguments.done", {**where, "name": item["name"],
                                                              "arguments": item["arguments"]})]
        return out + [("response.output_item.done", {"output_index": where["output_index"], "item": item})]


def response_object(ctx: ServerContext, body: ResponsesRequest, rid: str, created: int, *, status: str,
                    output: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    fmt = body.text.format if body.text and body.text.format else None
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls, "model": ctx.model_name, "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "reasoning": None, "store": body.store is not False, "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p, "top_logprobs": body.top_logprobs,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "tool_choice": (body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunctionChoice)
                        else body.tool_choice or "auto"),
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "truncation": body.truncation or "disabled", "usage": usage, "user": body.user,
        "metadata": body.metadata or {}, "background": bool(body.background),
    }


def _usage(prompt: int, output: int, cached: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output}


async def create_response(ctx: ServerContext, body: ResponsesRequest, request: HTTPRequest,
                          store: ResponseStore) -> Response:
    from ..tool_calls import StreamingToolParser

    history = store.conversation(body.previous_response_id) if body.previous_response_id else []
    conversation = history + [with_id(item) for item in body.items]
    try:
        job = await start_chat(ctx, to_chat(body, conversation))
    except APIError as e:  # named as this endpoint names them
        if e.param in _PARAMS:
            e.message, e.param = e.message.replace(e.param, _PARAMS[e.param]), _PARAMS[e.param]
        raise
    parallel = body.parallel_tool_calls is not False
    max_calls = 1 if not parallel else body.max_tool_calls
    rid, created = _id("resp"), now()

    async def generate() -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Stream events; the last is response.completed or response.incomplete."""
        parser = StreamingToolParser(job.tools) if job.tools else None
        output = _Output(max_calls)
        pending: list[dict[str, Any]] = []  # logprobs of tokens whose text is held back
        count, cached, incomplete = 0, 0, False
        async for _, ev in events(job.sub, None if body.background else request):
            pending += [lp.model_dump() for lp in chat_logprobs(ctx, ev.logprobs or [])]
            deltas = (parser.feed(ev.text) if parser else [{"content": ev.text}]) if ev.text else []
            if ev.finish_reason is not None:
                deltas += parser.finish() if parser else []
                count, cached, incomplete = ev.completion_tokens, ev.cached_tokens, ev.finish_reason == "length"
            for d in deltas:
                lps, pending = (pending, []) if "content" in d else ([], pending)
                for e in output.add(d, lps):
                    yield e
        for e in output.finish(incomplete):
            yield e
        status = "incomplete" if incomplete else "completed"
        final = response_object(ctx, body, rid, created, status=status, output=output.items,
                                usage=_usage(len(job.ids), count, cached))
        if body.store is not False:
            store.put(final, conversation, as_input(output.items))
        yield f"response.{status}", {"response": final}

    seq = itertools.count()

    def event(kind: str, fields: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(seq), **fields})}\n\n"

    if body.background:
        queued = response_object(ctx, body, rid, created, status="queued", output=[])
        store.put(queued, conversation, [])
        log = store.event_log(rid) if body.stream else None

        def emit(kind: str, fields: dict[str, Any]) -> None:
            if log is not None:
                log.append(event(kind, fields))

        async def work() -> None:
            emit("response.created", {"response": queued})
            emit("response.queued", {"response": queued})
            started = False
            try:
                async for kind, fields in generate():  # the last event comes after it puts the finished response
                    if not started:
                        started = True
                        store.set_status(rid, "in_progress")
                        emit("response.in_progress", {"response": {**queued, "status": "in_progress"}})
                    emit(kind, fields)
            except APIError as e:
                store.set_status(rid, "failed", error={"code": "server_error", "message": e.message})
                emit("error", {"code": e.code or e.type, "message": e.message, "param": e.param})

        store.run(rid, work(), cleanup=job.sub.cancel)
        if log is not None:  # a client that leaves this stream leaves the response generating
            return StreamingResponse(log.follow(), media_type="text/event-stream", headers=SSE_HEADERS)
        return Response(json.dumps(queued), media_type="application/json")

    if not body.stream:
        last: dict[str, Any] = {}
        try:
            async for _, last in generate():
                pass
        except ClientGone:
            return Response(status_code=499)
        finally:
            job.sub.cancel()
        return Response(json.dumps(last["response"]), media_type="application/json")

    async def stream() -> AsyncIterator[str]:
        start = response_object(ctx, body, rid, created, status="in_progress", output=[])
        yield event("response.created", {"response": start})
        yield event("response.in_progress", {"response": start})
        async for kind, fields in generate():
            yield event(kind, fields)

    def error_event(err: APIError) -> str:
        return event("error", {"code": err.code or err.type, "message": err.message, "param": err.param})

    return sse_response(stream(), job.sub, "responses", done=False, error_event=error_event)
