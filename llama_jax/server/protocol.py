"""Pydantic models of the OpenAI API subset the server speaks: requests in, responses out.

Requests are strict at the border: every field OpenAI documents for the endpoint is accepted
(see UNSUPPORTED below for the ones that are accepted only at a neutral value), a few vLLM-style
sampling extensions are accepted (top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids, structured_outputs), and anything else is a 400 naming the field. Numbers,
booleans and strings are not coerced from other types.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    computed_field,
    field_validator,
    model_serializer,
    model_validator,
)

from ..sampling import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from ..structured import StructuredOutput

# OpenAI allows 4; vLLM sets no limit, and evaluation harnesses (lm-eval's `until`) send more.
MAX_STOP_SEQUENCES = 64
MAX_N = 128  # OpenAI's limit on choices per request
MAX_LEGACY_LOGPROBS = 5  # OpenAI's limit for /v1/completions


def _no_surrogates(value: Any) -> Any:
    """Reject lone UTF-16 surrogates ("\\ud800" escapes are valid JSON but not text)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("strings must be valid Unicode (lone surrogate escape found)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_surrogates(k)
            _no_surrogates(v)
    elif isinstance(value, list):
        for v in value:
            _no_surrogates(v)
    return value


Number = StrictFloat | StrictInt
Text = StrictStr
FunctionName = Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- chat messages ----


class TextPart(_Input):
    type: Literal["text"]
    text: Text


Content = Text | list[TextPart]


def content_text(content: Content | None) -> str:
    """Plain text of a message's content; text parts join with newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.text for p in content)


class FunctionCallIn(_Input):
    name: FunctionName
    arguments: Text  # a JSON-encoded object, as OpenAI sends it


class ToolCallIn(_Input):
    id: Text
    type: Literal["function"]
    function: FunctionCallIn


class SystemMessage(_Input):
    role: Literal["system", "developer"]
    content: Content
    name: Text | None = None


class UserMessage(_Input):
    role: Literal["user"]
    content: Content
    name: Text | None = None


class AssistantMessage(_Input):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCallIn] | None = None
    name: Text | None = None
    # Present (null) when a client sends back a message it received: accepted, not used.
    refusal: Text | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    @model_validator(mode="after")
    def _has_output(self) -> "AssistantMessage":
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Input):
    role: Literal["tool"]
    content: Content
    tool_call_id: Text


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


# ---- tools ----


class FunctionDef(_Input):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @field_validator("parameters")
    @classmethod
    def _json_schema_object(cls, p: dict[str, Any] | None) -> dict[str, Any] | None:
        """The checks OpenAI makes on a function's parameters: a JSON Schema of an object."""
        if p is None:
            return p
        if p.get("type", "object") != "object":
            raise ValueError("parameters must be a JSON Schema with type 'object'")
        props = p.get("properties", {})
        if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
            raise ValueError("parameters.properties must map each property name to a schema object")
        required = p.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError("parameters.required must be a list of property names")
        missing = [r for r in required if "properties" in p and r not in props]
        if missing:
            raise ValueError(f"parameters.required names {missing[0]!r}, which is not in properties")
        return p


class ToolDef(_Input):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Input):
    name: FunctionName


class NamedToolChoice(_Input):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Input):
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None  # accepted; chunks are never padded
    continuous_usage_stats: StrictBool | None = None  # vLLM's: with include_usage, usage so far in every chunk


class JSONSchemaFormat(_Input):
    name: Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` is a BaseModel method
    strict: StrictBool | None = None  # the output always follows the schema


class ResponseFormat(_Input):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self

    def constraint(self) -> StructuredOutput | None:
        if self.type == "json_object" or (self.json_schema is not None and self.json_schema.schema_ is None):
            return StructuredOutput(json_object=True)
        if self.json_schema is not None:
            return StructuredOutput(json=self.json_schema.schema_)
        return None


class StructuredOutputs(_Input):
    """vLLM's `structured_outputs` extension: exactly one of the fields."""

    json_: dict[str, Any] | Text | None = Field(None, alias="json")  # a JSON schema
    json_object: StrictBool | None = None
    regex: Text | None = None
    choice: Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1)] | None = None
    grammar: Text | None = None  # Lark or GBNF

    @model_validator(mode="after")
    def _one(self) -> "StructuredOutputs":
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if len(given) + bool(self.json_object) != 1:
            raise ValueError("give exactly one of json, json_object, regex, choice, grammar")
        return self

    def constraint(self) -> StructuredOutput:
        return StructuredOutput(json=self.json_, json_object=bool(self.json_object), regex=self.regex,
                                choice=tuple(self.choice) if self.choice else None, grammar=self.grammar)


def check_function_names(names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise ValueError("function names must be unique")


def check_tool_choice(choice: Any, names: list[str], named: str | None) -> None:
    """A tool_choice against the names of the request's functions (`named`: the one a named
    choice names)."""
    if choice not in (None, "none", "auto") and not names:
        raise ValueError(f"tool_choice {choice if isinstance(choice, str) else 'function'!r} requires tools")
    if named is not None and named not in names:
        raise ValueError(f"function {named!r} is not in tools")


# Fields OpenAI documents that this server accepts only when absent, null or empty; any other
# value is a 400 saying it is not supported.
UNSUPPORTED = ("functions", "function_call", "audio", "web_search_options", "suffix")


class _SamplingFields(_Input):
    """Sampling fields shared by both endpoints."""

    model: Text
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stop: Text | list[Text] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Number] | None = None
    user: Text | None = None
    # vLLM-compatible extensions (the openai client sends them through `extra_body`).
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0)] | None = None
    ignore_eos: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True  # special tokens' text left out of the output text
    # vLLM's: with serve.py --scheduling-policy priority, lower values are admitted first.
    priority: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] = 0
    # vLLM's: only the prompt's last k tokens are kept (-1: as many as the context holds).
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = None
    # vLLM's, for its slow (Python) tokenizers; its fast ones, as ours, add no spaces: accepted, no effect.
    spaces_between_special_tokens: StrictBool = True
    return_token_ids: StrictBool = False  # vLLM's: the token ids of the prompt and of each choice
    # The prompt tokens' own log-probabilities, with this many alternatives each (not streamed).
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # Constrained output: OpenAI's field (vLLM takes it on /v1/completions too), or vLLM's.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        return _no_surrogates(data)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys must be token ids (decimal integers), got {key!r}")
            if not abs(value) <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                 f"got {value}")
        return bias

    @field_validator(*UNSUPPORTED, check_fields=False)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, {}, []):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_a_token(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("truncate_prompt_tokens must be -1 or a number of tokens >= 1")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("prompt_logprobs")
    @classmethod
    def _not_streamed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("stream"):
            raise ValueError("prompt_logprobs is not available with stream")
        return value

    @field_validator("structured_outputs")
    @classmethod
    def _one_constraint(cls, value: StructuredOutputs | None, info: ValidationInfo) -> StructuredOutputs | None:
        fmt = info.data.get("response_format")
        if value is not None and fmt is not None and fmt.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def dump(self, out: BaseModel, *, chunk: bool = False) -> str:
        """`out` (a response or chunk of this request) as JSON: usage only in chunks that asked
        for it, token ids only when asked for."""
        exclude: dict[str, Any] = {}
        if chunk and not self.include_usage:
            exclude["usage"] = True
        if not self.return_token_ids:
            exclude.update(prompt_token_ids=True, choices={"__all__": {"token_ids", "prompt_token_ids"}})
        return out.model_dump_json(exclude=exclude or None)

    @property
    def continuous_usage(self) -> bool:
        """Whether every streamed chunk carries the usage so far (vLLM's continuous_usage_stats)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def constraint(self) -> tuple[StructuredOutput | None, str | None]:
        """The structured-output constraint and the field it came from. Raises ValueError
        (StructuredOutput's checks: a schema that is not an object, ...)."""
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint(), "structured_outputs"
        if self.response_format is not None:
            return self.response_format.constraint(), "response_format"
        return None, None


class ChatCompletionRequest(_SamplingFields):
    DEFAULT_MAX_TOKENS: ClassVar[int | None] = None  # up to the context, as OpenAI's chat

    messages: Annotated[list[Message], Field(min_length=1)]
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    modalities: list[Literal["text"]] | None = None
    # vLLM's: end the prompt with the assistant's header (default), or inside the final assistant
    # message, which the model then goes on writing (a prefilled answer).
    add_generation_prompt: StrictBool | None = None
    continue_final_message: StrictBool = False
    # vLLM's: variables for the chat template (Llama 3.1's: tools_in_user_message, date_string,
    # builtin_tools; a checkpoint's own Jinja template sees them all).
    chat_template_kwargs: dict[str, Any] | None = None
    # Accepted and without effect here: storage, routing, latency and reasoning hints.
    store: StrictBool | None = None
    prediction: dict[str, Any] | None = None
    metadata: dict[str, Text] | None = None
    service_tier: Text | None = None
    reasoning_effort: Text | None = None
    verbosity: Text | None = None
    prompt_cache_key: Text | None = None
    safety_identifier: Text | None = None
    # Documented but unsupported (see UNSUPPORTED): only absent, null or empty passes.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    web_search_options: Any = None

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[ToolDef] | None) -> list[ToolDef] | None:
        check_function_names([t.function.name for t in tools or []])
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_in_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        check_tool_choice(choice, [t.function.name for t in info.data.get("tools") or []], named)
        return choice

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top

    @model_validator(mode="after")
    def _one_ending(self) -> "ChatCompletionRequest":
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other")
        return self

    @property
    def generation_prompt(self) -> bool:
        """Whether the prompt ends with a new assistant header (add_generation_prompt, by default
        unless the final message is continued)."""
        if self.add_generation_prompt is None:
            return not self.continue_final_message
        return self.add_generation_prompt

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Prompt = Text | list[StrictInt] | list[Text] | list[list[StrictInt]]


class CompletionRequest(_SamplingFields):
    DEFAULT_MAX_TOKENS: ClassVar[int] = 16  # OpenAI's default for /v1/completions

    prompt: Prompt
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LEGACY_LOGPROBS)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and (not prompt or any(p in ("", []) for p in prompt)):
            raise ValueError("prompt must not be empty")
        return prompt

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != info.data.get("n"):
            raise ValueError("best_of other than n is not supported")
        return best_of

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: a string, a token-id list, or a list of either."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens


class LoadLoraAdapterRequest(_Input):
    """vLLM's /v1/load_lora_adapter: serve the adapter directory `lora_path` as model `lora_name`."""

    lora_name: Annotated[Text, Field(min_length=1)]
    lora_path: Annotated[Text, Field(min_length=1)]
    load_inplace: StrictBool = False  # replace the weights of an adapter of that name


class UnloadLoraAdapterRequest(_Input):
    """vLLM's /v1/unload_lora_adapter."""

    lora_name: Annotated[Text, Field(min_length=1)]
    lora_int_id: int | None = None  # vLLM's internal id; names identify adapters here


class TokenizeRequest(_Input):
    """vLLM's /tokenize: a raw prompt, or messages rendered by the chat format."""

    model: Text
    prompt: Text | None = None
    add_special_tokens: StrictBool = True  # the BOS a completion's prompt gets
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    tools: list[ToolDef] | None = None
    add_generation_prompt: StrictBool | None = None  # as in a chat request
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None  # as in a chat request
    return_token_strs: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        return _no_surrogates(data)

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages, not both")
        if (self.tools is not None or self.chat_template_kwargs is not None) and self.messages is None:
            raise ValueError("tools and chat_template_kwargs go with messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other")
        return self


class DetokenizeRequest(_Input):
    model: Text
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


# ---- responses ----


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # found in the cache (prefix reuse), not computed again


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> "Usage":
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    refusal: None = None


class PromptLogprob(BaseModel):
    """vLLM's entry of `prompt_logprobs`: one token's log-probability at one prompt position."""

    logprob: float
    rank: int  # 1: the most likely token there
    decoded_token: str


# Per prompt token: None for the first, else {token id: PromptLogprob} for the token itself and
# the `prompt_logprobs` most likely ones.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it
    token_ids: list[int] | None = None  # with return_token_ids


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids


class _Sparse(BaseModel):
    """A model whose unset (None) fields are left out of the JSON, as in OpenAI's deltas."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunction(_Sparse):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None


class Delta(_Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it
    token_ids: list[int] | None = None  # with return_token_ids: the tokens this chunk's text came from


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids, in the first chunk


class LegacyLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids (streamed: in the choice's first chunk)
    token_ids: list[int] | None = None  # with return_token_ids


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """OpenAI's model object, with vLLM's fields and Anthropic's (type, display_name, created_at),
    so the clients of both APIs read it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llama-jax"
    max_model_len: int
    parent: str | None = None  # a LoRA adapter's base model, as vLLM lists adapters
    type: Literal["model"] = "model"

    @computed_field
    def display_name(self) -> str:
        return self.id

    @computed_field
    def created_at(self) -> str:
        return dt.datetime.fromtimestamp(self.created, dt.timezone.utc).isoformat().replace("+00:00", "Z")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    has_more: bool = False  # Anthropic's page fields: the whole list is one page

    @computed_field
    def first_id(self) -> str | None:
        return self.data[0].id if self.data else None

    @computed_field
    def last_id(self) -> str | None:
        return self.data[-1].id if self.data else None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
