"""Chat prompts: the Llama 3.1 format (Meta's rendering, or the Hugging Face template's), and a
checkpoint's own Jinja chat template rendered in a sandbox.

Messages are OpenAI-style dicts: {"role": "system"|"user"|"assistant"|"tool"|"ipython",
"content": str or [{"type": "text", "text": str}, ...]}, assistant messages may carry
"tool_calls" ([{"id", "type": "function", "function": {"name", "arguments": JSON str or dict}}])
and tool messages a "tool_call_id". Tools are OpenAI function dicts; a function named
brave_search, wolfram_alpha or code_interpreter (or just that name as a string) is a built-in tool.

Both formats take per-call template variables (`chat_template_kwargs`, as vLLM's requests and
transformers' apply_chat_template pass them): a Jinja template sees them all; the Llama 3.1
format reads the three its Hugging Face template reads (tools_in_user_message, date_string,
builtin_tools) and, like a template, ignores the others.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .tokenizer import Tokenizer
from .tool_calls import BUILTIN_TOOLS, ToolSpec, declared_tools

__all__ = ["ChatFormat", "ChatTemplateError", "JinjaChatFormat", "TemplateKwargsError", "chat_format_for",
           "read_chat_template", "tools_to_parse", "validate_messages"]

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # spelled out here: strftime's %B follows the process locale
_ROLES = ("system", "user", "assistant", "tool", "ipython")


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or raised an error on purpose."""


class TemplateKwargsError(ValueError):
    """A call's chat_template_kwargs are not what the chat format takes."""


# --------------------------------------------------------------------------------------------
# Message validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str | None


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool ("ipython" is read as "tool")
    parts: tuple[str, ...]  # the text content, part by part
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _content_parts(content: Any, where: str) -> tuple[str, ...]:
    if isinstance(content, str):
        return (content,)
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}.content[{j}]: only {{'type': 'text', 'text': str}} parts are supported")
            parts.append(part["text"])
        return tuple(parts)
    raise ValueError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")


def _tool_call(call: Any, where: str) -> ToolCall:
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be a dict")
    if call.get("type", "function") != "function":
        raise ValueError(f"{where}.type must be 'function'")
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}.function.name must be a non-empty string")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments is not valid JSON: {e}") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object")
    if fn["name"] == "code_interpreter" and not isinstance(args.get("code"), str):
        raise ValueError(f"{where}.function.arguments: a code_interpreter call needs a string 'code'")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise ValueError(f"{where}.id must be a string")
    return ToolCall(fn["name"], args, call_id)


def validate_messages(messages: Any) -> list[Message]:
    """Check OpenAI-style messages and normalise them; a ValueError names the message and field."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out: list[Message] = []
    open_calls: list[ToolCall] | None = None  # calls of the last assistant message, while tool results follow
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in _ROLES:
            raise ValueError(f"{where}.role: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        if role == "ipython":
            role = "tool"
        calls: tuple[ToolCall, ...] = ()
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise ValueError(f"{where}.tool_calls must be a list")
            calls = tuple(_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(m["tool_calls"]))
        content = m.get("content")
        if content is None:
            if not calls:
                raise ValueError(f"{where}.content is missing")
            parts: tuple[str, ...] = ()
        else:
            parts = _content_parts(content, where)
        if role == "tool":
            if open_calls is None:
                raise ValueError(f"{where}: a tool message must follow an assistant message with tool_calls")
            call_id = m.get("tool_call_id")
            ids = {c.id for c in open_calls if c.id is not None}
            if call_id is not None and ids and call_id not in ids:
                raise ValueError(f"{where}.tool_call_id {call_id!r} matches no call of the preceding assistant message")
        else:
            open_calls = list(calls) if calls else None
        out.append(Message(role, parts, calls))
    return out


# --------------------------------------------------------------------------------------------
# Llama 3.1
# --------------------------------------------------------------------------------------------

_Segment = int | str  # a special token id, or text


def final_message_to_continue(msgs: list[Message], add_generation_prompt: bool) -> str:
    """The text of the final message, checked to be one the model can go on writing."""
    if add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt exclude each other")
    last = msgs[-1]
    if last.role != "assistant" or last.tool_calls or not last.text.strip():
        raise ValueError("continue_final_message needs the last message to be an assistant message with text "
                         "(and no tool calls)")
    return last.text


def _tojson_html(value: Any) -> str:
    # Jinja's own tojson (which Meta's prompt templates use): sorted keys, ASCII, HTML-safe.
    text = json.dumps(value, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027")


def _meta_params(spec: ToolSpec) -> list[tuple[str, dict, bool]]:
    """(name, property schema, required) per parameter of a custom tool's JSON schema."""
    schema = (spec.definition or {}).get("function", {}).get("parameters") or {}
    props = schema.get("properties") or {}
    required = schema.get("required") or []
    return [(name, prop if isinstance(prop, dict) else {}, name in required) for name, prop in props.items()]


def _meta_json_tools_prompt(custom: list[ToolSpec]) -> str:
    # Meta's JSON custom-tool prompt (llama-models' JsonCustomToolGenerator); its quirks are kept:
    # descriptions are not JSON-escaped and every property is typed "object".
    blocks = []
    for spec in custom:
        fn = (spec.definition or {}).get("function", {})
        params = _meta_params(spec)
        props = ",".join(
            "\n                {\n"
            f'                    "{name}": {{\n'
            '                        "type": "object",\n'
            f'                        "description": "{prop.get("description")}"\n'
            "                    }\n"
            "                }"
            for name, prop, _ in params
        )
        blocks.append(
            "{\n"
            '    "type": "function",\n'
            '    "function": {\n'
            f'        "name": "{spec.name}",\n'
            f'        "description": "{fn.get("description")}",\n'
            '        "parameters": {\n'
            '            "type": "object",\n'
            f'            "properties": [{props}\n'
            "            ],\n"
            f'            "required": {_tojson_html([n for n, _, req in params if req])}\n'
            "        }\n"
            "    }\n"
            "}\n"
        )
    return (
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\n"
        "Here is a list of functions in JSON format:\n" + "".join(blocks) + "\nReturn function calls in JSON format."
    )


def _meta_function_tag_tools_prompt(custom: list[ToolSpec]) -> str:
    # Meta's `<function=...>` custom-tool prompt (llama-models' FunctionTagCustomToolGenerator).
    blocks = []
    for spec in custom:
        desc = (spec.definition or {}).get("function", {}).get("description")
        params = {
            name: {"description": prop.get("description"), "param_type": str(prop.get("type", "string")),
                   "required": req}
            for name, prop, req in _meta_params(spec)
        }
        blocks.append(
            f"Use the function '{spec.name}' to '{desc}':\n"
            f'{{"name": "{spec.name}", "description": "{desc}", "parameters": {_tojson_html(params)}}}\n\n'
        )
    return (
        "You have access to the following functions:\n\n" + "".join(blocks)
        + "Think very carefully before calling functions.\n"
        "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
        '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
        "Reminder:\n"
        "- If looking for real time information use relevant functions before falling back to brave_search\n"
        "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
        "- Required parameters MUST be specified\n"
        "- Only call one function at a time\n"
        "- Put the entire function call reply on one line"
    )


_HF_CALL_FORMAT = (
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
)


class ChatFormat:
    """The Llama 3.1 Instruct chat format, rendered to token ids.

    style="meta": as Meta's llama-models renders it (ChatFormat.encode_dialog_prompt with the
      system prompt of its prompt templates): date as "23 November 2026", custom tools in a
      user message of their own before the dialog, assistant tool calls ending in <|eom_id|>.
    style="hf": as the chat template of meta-llama/Llama-3.1-8B-Instruct's tokenizer_config.json
      renders it: date as "23 Nov 2026", messages trimmed, custom tools folded into the first user
      message, one tool call per assistant message, tool results JSON-encoded.
    `tools_in_system`: put the custom tool definitions in the system message instead.
    `tool_prompt_format` ("meta" only): "json", or "function_tag" for `<function=...>` calls.
    `today`: the "Today Date" (default: the current date, read at each call).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        style: Literal["meta", "hf"] = "meta",
        today: dt.date | None = None,
        tools_in_system: bool = False,
        tool_prompt_format: Literal["json", "function_tag"] = "json",
    ):
        if style not in ("meta", "hf"):
            raise ValueError(f"style must be 'meta' or 'hf', got {style!r}")
        if tool_prompt_format not in ("json", "function_tag"):
            raise ValueError(f"tool_prompt_format must be 'json' or 'function_tag', got {tool_prompt_format!r}")
        if style == "hf" and tool_prompt_format != "json":
            raise ValueError("the Hugging Face template only has the JSON tool prompt format")
        ids: dict[str, int | None] = {}
        for name in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                     "<|python_tag|>"):
            ids[name] = tokenizer.token_id(name)
            if ids[name] is None:
                raise ValueError(f"the tokenizer has no {name} token: not a Llama 3 tokenizer (use JinjaChatFormat)")
        self.tokenizer = tokenizer
        self.style = style
        self.today = today
        self.tools_in_system = tools_in_system
        self.tool_prompt_format = tool_prompt_format
        self.date_string: str | None = None  # the "Today Date" text as given, in place of `today`'s
        self._bos, self._start = ids["<|begin_of_text|>"], ids["<|start_header_id|>"]
        self._end = ids["<|end_header_id|>"]
        self._eot, self._eom, self._python = ids["<|eot_id|>"], ids["<|eom_id|>"], ids["<|python_tag|>"]

    def encode_dialog(
        self, messages: list[dict], tools: list[dict | str] | None = None, *, add_generation_prompt: bool = True,
        continue_final_message: bool = False, chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of the dialog, starting with <|begin_of_text|>; with the assistant header to
        complete at the end if `add_generation_prompt`; or, if `continue_final_message`, ending
        inside the final (assistant) message, which the model then goes on writing.
        `chat_template_kwargs`: the Hugging Face template's variables for this dialog:
        `tools_in_user_message` (False: custom tools go in the system message), `date_string`
        (the "Today Date" text) and `builtin_tools` (names added to `tools`); others are ignored."""
        fmt, tools = self._with_kwargs(chat_template_kwargs, tools)
        ids: list[int] = []
        for seg in fmt._segments(messages, tools, add_generation_prompt, continue_final_message):
            ids += [seg] if isinstance(seg, int) else self.tokenizer.encode(seg)
        return ids

    def render(
        self, messages: list[dict], tools: list[dict | str] | None = None, *, add_generation_prompt: bool = True,
        continue_final_message: bool = False, chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt as text, special tokens written out."""
        fmt, tools = self._with_kwargs(chat_template_kwargs, tools)
        return "".join(
            s if isinstance(s, str) else self.tokenizer.decode([s])
            for s in fmt._segments(messages, tools, add_generation_prompt, continue_final_message)
        )

    def _with_kwargs(
        self, kwargs: Mapping[str, Any] | None, tools: list[dict | str] | None
    ) -> tuple[ChatFormat, list[dict | str] | None]:
        """This format with the template variables of one call applied, and the tools they add."""
        if not kwargs:
            return self, tools
        if not isinstance(kwargs, Mapping):
            raise TemplateKwargsError(f"chat_template_kwargs must be a mapping, got {type(kwargs).__name__}")
        fmt = copy.copy(self)
        if kwargs.get("tools_in_user_message") is not None:
            if not isinstance(kwargs["tools_in_user_message"], bool):
                raise TemplateKwargsError("chat_template_kwargs.tools_in_user_message must be a boolean")
            fmt.tools_in_system = not kwargs["tools_in_user_message"]
        if kwargs.get("date_string") is not None:
            if not isinstance(kwargs["date_string"], str):
                raise TemplateKwargsError("chat_template_kwargs.date_string must be a string")
            fmt.date_string = kwargs["date_string"]
        builtin = kwargs.get("builtin_tools")
        if builtin is not None:
            if not isinstance(builtin, list) or any(n not in BUILTIN_TOOLS for n in builtin):
                raise TemplateKwargsError(f"chat_template_kwargs.builtin_tools must be a list of {BUILTIN_TOOLS}")
            named = {s.name for s in declared_tools(tools)}
            tools = [*dict.fromkeys(n for n in builtin if n not in named), *(tools or [])]
        return fmt, tools

    # -- building blocks --
    def _date(self) -> str:
        if self.date_string is not None:
            return self.date_string
        d = self.today or dt.date.today()
        month = _MONTHS[d.month - 1]
        return f"{d.day:02d} {month if self.style == 'meta' else month[:3]} {d.year}"

    def _header(self, role: str) -> list[_Segment]:
        return [self._start, role, self._end, "\n\n"]

    def _segments(
        self, messages: list[dict], tools: list[dict | str] | None, gen: bool, cont: bool = False
    ) -> list[_Segment]:
        msgs = validate_messages(messages)
        if cont:
            final_message_to_continue(msgs, gen)
        specs = declared_tools(tools)
        builtin = [s.name for s in specs if s.builtin]
        custom = [s for s in specs if not s.builtin]
        system = msgs[0].text if msgs[0].role == "system" else None
        rest = msgs[1:] if system is not None else msgs
        build = self._meta if self.style == "meta" else self._hf
        segs = build(rest, system, builtin, custom)
        if cont:
            assert segs[-1] == self._eot
            segs.pop()  # the final message stays open
        if gen:
            segs += self._header("assistant")
        if self.style == "hf":  # the template is one string: adjacent text is tokenized together
            merged: list[_Segment] = []
            for s in segs:
                if isinstance(s, str) and merged and isinstance(merged[-1], str):
                    merged[-1] += s
                elif s != "":
                    merged.append(s)
            segs = merged
        return segs

    # -- Meta --
    def _meta(
        self, msgs: list[Message], system: str | None, builtin: list[str], custom: list[ToolSpec]
    ) -> list[_Segment]:
        # System prompt as llama-models' prompt templates build it: tool line(s), date, instruction.
        text = ""
        if builtin or custom:
            text += "Environment: ipython\n"
            listed = [n for n in builtin if n != "code_interpreter"]
            if listed:
                text = text + "Tools: " + ", ".join(listed)
            text += "\n"
        text += f"Cutting Knowledge Date: December 2023\nToday Date: {self._date()}"
        tools_prompt = ""
        if custom:
            tools_prompt = (_meta_json_tools_prompt if self.tool_prompt_format == "json"
                            else _meta_function_tag_tools_prompt)(custom)
        if custom and self.tools_in_system:
            text += "\n\n" + tools_prompt
        if system:
            text += "\n\n" + system
        text += "\n"
        segs: list[_Segment] = [self._bos, *self._header("system"), text, self._eot]
        if custom and not self.tools_in_system:
            segs += [*self._header("user"), tools_prompt, self._eot]
        for m in msgs:
            segs += self._meta_message(m)
        return segs

    def _meta_message(self, m: Message) -> list[_Segment]:
        segs: list[_Segment] = self._header("ipython" if m.role == "tool" else m.role)
        if m.tool_calls and m.tool_calls[0].name in BUILTIN_TOOLS:
            segs.append(self._python)
        segs += m.parts
        for call in m.tool_calls:
            segs.append(self._meta_call(call))
        segs.append(self._eom if m.tool_calls else self._eot)
        return segs

    def _meta_call(self, call: ToolCall) -> str:
        if call.name == "code_interpreter":
            return call.arguments["code"]
        if call.name in ("brave_search", "wolfram_alpha"):
            return f"{call.name}.call(" + ", ".join(f'{k}="{v}"' for k, v in call.arguments.items()) + ")"
        if self.tool_prompt_format == "function_tag":
            return f"<function={call.name}>{json.dumps(call.arguments)}</function>"
        return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments})

    # -- Hugging Face --
    def _hf(
        self, msgs: list[Message], system: str | None, builtin: list[str], custom: list[ToolSpec]
    ) -> list[_Segment]:
        def tool_json(spec: ToolSpec) -> str:
            return json.dumps(spec.definition, indent=4, ensure_ascii=False) + "\n\n"

        text = ""
        if builtin or custom:
            text += "Environment: ipython\n"
        if builtin:
            text += "Tools: " + ", ".join(n for n in builtin if n != "code_interpreter") + "\n\n"
        text += f"Cutting Knowledge Date: December 2023\nToday Date: {self._date()}\n\n"
        if custom and self.tools_in_system:
            text += ("You have access to the following functions. "
                     "To call a function, please respond with JSON for a function call.")
            text += _HF_CALL_FORMAT + "Do not use variables.\n\n" + "".join(tool_json(s) for s in custom)
        text += (system or "").strip()
        segs: list[_Segment] = [self._bos, *self._header("system"), text, self._eot]
        if custom and not self.tools_in_system:
            if not msgs or msgs[0].role != "user":
                raise ValueError(
                    "the Hugging Face template puts the tools in the first user message, and there is none"
                )
            first, msgs = msgs[0], msgs[1:]
            segs += [
                *self._header("user"),
                "Given the following functions, please respond with a JSON for a function call with its proper "
                "arguments that best answers the given prompt.\n\n" + _HF_CALL_FORMAT + "Do not use variables.\n\n",
                *(tool_json(s) for s in custom),
                first.text.strip(),
                self._eot,
            ]
        for m in msgs:
            if m.role == "tool":
                # The template JSON-encodes tool output (a string is `iterable` to Jinja).
                segs += [*self._header("ipython"), json.dumps(m.text, ensure_ascii=False), self._eot]
            elif m.tool_calls:
                if len(m.tool_calls) != 1:
                    raise ValueError("the Hugging Face Llama 3.1 template supports one tool call per assistant message")
                call = m.tool_calls[0]
                segs += self._header("assistant")
                if call.name in builtin:
                    args = ", ".join(f'{k}="{v}"' for k, v in call.arguments.items())
                    segs += [self._python, f"{call.name}.call({args})"]
                else:
                    args = json.dumps(call.arguments, ensure_ascii=False)
                    segs.append(f'{{"name": "{call.name}", "parameters": {args}}}')
                segs.append(self._eom if builtin else self._eot)
            else:
                segs += [*self._header(m.role), m.text.strip(), self._eot]
        return segs


# --------------------------------------------------------------------------------------------
# A checkpoint's own Jinja template
# --------------------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Chat templates expect plain JSON from tojson (not Jinja's HTML-escaped one).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types, so a template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise ValueError(f"chat template input must be JSON data, got {type(value).__name__}")


# What `JinjaChatFormat.render` itself gives a template; chat_template_kwargs cannot replace them.
_TEMPLATE_ARGUMENTS = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")


class JinjaChatFormat:
    """A checkpoint's Jinja chat template (tokenizer_config.json or GGUF metadata), rendered in
    Jinja's immutable sandbox with the helpers Hugging Face templates use (raise_exception,
    strftime_now, tojson), then tokenized with special-token text read as special tokens."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str | None = None,
        *,
        today: dt.date | None = None,
        extra_context: dict[str, Any] | None = None,
    ):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = template if template is not None else tokenizer.chat_template
        if not template:
            raise ValueError("the tokenizer has no chat template; pass one")
        self.tokenizer = tokenizer
        self.today = today
        self.extra_context = _plain(extra_context or {})
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = self._strftime_now
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e}") from None

    def _strftime_now(self, fmt: str) -> str:
        now = dt.datetime.now()
        if self.today is not None:
            now = dt.datetime.combine(self.today, now.time())
        return now.strftime(fmt)

    def render(
        self, messages: list[dict], tools: list[dict | str] | None = None, *, add_generation_prompt: bool = True,
        continue_final_message: bool = False, chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The template's text for the dialog; with `continue_final_message`, cut right after the
        final message's text (where the template put it), so the model goes on writing it.
        `chat_template_kwargs`: more variables for the template (over `extra_context`'s)."""
        msgs = validate_messages(messages)
        final = final_message_to_continue(msgs, add_generation_prompt) if continue_final_message else None
        declared_tools(tools)
        kwargs = chat_template_kwargs or {}
        if not isinstance(kwargs, Mapping):
            raise TemplateKwargsError(f"chat_template_kwargs must be a mapping, got {type(kwargs).__name__}")
        taken = sorted(set(kwargs) & set(_TEMPLATE_ARGUMENTS))
        if taken:
            raise TemplateKwargsError(f"chat_template_kwargs may not set {taken}: the request gives them")
        tok = self.tokenizer
        context = {
            **self.extra_context,
            **_plain(dict(kwargs)),
            "messages": [_template_message(m, raw) for m, raw in zip(msgs, messages)],
            "tools": _plain(tools) if tools is not None else None,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": tok.decode([tok.bos_id]) if tok.bos_id is not None else "",
            "eos_token": tok.decode([tok.eos_id]) if tok.eos_id is not None else "",
        }
        try:
            text = self._template.render(context)
        except ChatTemplateError:
            raise
        except Exception as e:  # an untrusted template can fail in any way; report it as the template's fault
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
        if final is None:
            return text
        for piece in (final, final.strip()):  # templates often trim message text
            at = text.rfind(piece)
            if at >= 0:
                return text[: at + len(piece)]
        raise ChatTemplateError("continue_final_message: the chat template does not write the final message's text")

    def encode_dialog(
        self, messages: list[dict], tools: list[dict | str] | None = None, *, add_generation_prompt: bool = True,
        continue_final_message: bool = False, chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        text = self.render(messages, tools, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs)
        return self.tokenizer.encode(text, allow_special=True)


def _template_message(m: Message, raw: dict) -> dict:
    # A message with tool calls and no text gets "" (as vLLM passes it): templates concatenate content.
    content = raw.get("content")
    out: dict[str, Any] = {"role": raw["role"], "content": "" if content is None else _plain(content)}
    if m.tool_calls:
        # Templates read arguments as a mapping (`| items`, `| tojson`), so they get parsed ones.
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _plain(c.arguments)}}
            for c in m.tool_calls
        ]
    for key in ("tool_call_id", "name"):
        if isinstance(raw.get(key), str):
            out[key] = raw[key]
    return out


def tools_to_parse(tools: list[Any] | None, chat_template_kwargs: Mapping[str, Any] | None) -> list[Any] | None:
    """The tools whose calls to look for in a reply: `tools`, and the built-in tools named by
    chat_template_kwargs' `builtin_tools` (how the Llama 3.1 template declares them)."""
    builtin = (chat_template_kwargs or {}).get("builtin_tools")
    if not isinstance(builtin, list):
        return tools
    named = {s.name for s in declared_tools(tools)}
    extra = [n for n in builtin if isinstance(n, str) and n in BUILTIN_TOOLS and n not in named]
    return [*(tools or []), *dict.fromkeys(extra)] or tools


def read_chat_template(template: str | Path) -> str:
    """A chat template given as vLLM's --chat-template takes it: a file's path, or the template's
    own text (anything with a Jinja tag in it)."""
    path = Path(template)
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except (OSError, ValueError):  # a template's text can be too long (or odd) a name to test
        pass
    text = str(template)
    if "{{" in text or "{%" in text:
        return text
    raise ValueError(f"chat template {text!r}: no such file, and not a Jinja template's text")


def chat_format_for(tokenizer: Tokenizer, template: str | None = None, **kw: Any) -> ChatFormat | JinjaChatFormat:
    """The Llama 3.1 format for a Llama 3 tokenizer (it has <|start_header_id|> and <|eot_id|>),
    else the tokenizer's own chat template; keyword options go to that class. `template`: a Jinja
    chat template's text, used instead of either."""
    if template is not None:
        return JinjaChatFormat(tokenizer, template, **kw)
    if tokenizer.token_id("<|start_header_id|>") is not None and tokenizer.token_id("<|eot_id|>") is not None:
        return ChatFormat(tokenizer, **kw)
    if tokenizer.chat_template:
        unknown = set(kw) - {"today", "extra_context"}
        if unknown:
            raise ValueError(
                f"options {sorted(unknown)} apply to the Llama 3.1 format only; this tokenizer uses its own template"
            )
        return JinjaChatFormat(tokenizer, **kw)
    raise ValueError("the tokenizer is not a Llama 3 tokenizer and has no chat template: no chat format for it")
