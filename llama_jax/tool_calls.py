"""Tool calls in Llama 3.1 output: from the assistant's text to OpenAI `tool_calls`, whole or streamed.

Recognised call forms (only calls to tools declared in `tools` count):
  - built-in:  `<|python_tag|>brave_search.call(query="...")` (any declared name, keyword arguments);
  - code:      `<|python_tag|>` + code, when `code_interpreter` is declared and the text after the
               tag holds no other call -> code_interpreter with {"code": ...};
  - JSON:      `{"name": ..., "parameters"|"arguments": {...}}` (optional "type": "function"; no other keys),
               with or without `<|python_tag|>`, several separated by `;`/whitespace, or a JSON list;
  - tags:      `<function=name>{...}</function>`;
  - pythonic:  `[f(a=1), g(b="x")]`.

Everything else is content: text before and between calls, JSON that is not a call to a declared
tool, malformed or truncated calls. Whitespace next to a call and `;` after one are separators; the
`<|python_tag|>` marker is dropped; the text ends at the first `<|eot_id|>`, `<|eom_id|>` or
`<|end_of_text|>`. The parser never raises on model output.

Streaming and whole-text parsing are the same scanner: whole text is one piece followed by the end.
The scanner only commits to a decision that no later text can change (a call is committed when it
is complete and valid), so any split of the text gives the same content and calls.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BUILTIN_TOOLS", "StreamingToolParser", "ToolSpec", "declared_tools", "parse_tool_calls"]

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
PYTHON_TAG = "<|python_tag|>"
STOP_MARKERS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
_FUNCTION_OPEN, _FUNCTION_CLOSE = "<function=", "</function>"


@dataclass(frozen=True)
class ToolSpec:
    """One declared tool: built-in (brave_search, wolfram_alpha, code_interpreter) or custom."""

    name: str
    builtin: bool
    definition: dict | None  # the OpenAI {"type": "function", "function": {...}} dict, if given


def declared_tools(tools: list[dict | str] | None) -> list[ToolSpec]:
    """Validate a request's `tools`: OpenAI function dicts, or a built-in tool's name as a string."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list, got {type(tools).__name__}")
    out, seen = [], set()
    for i, t in enumerate(tools):
        if isinstance(t, str):
            if t not in BUILTIN_TOOLS:
                raise ValueError(
                    f"tools[{i}]: {t!r} is not a built-in tool {BUILTIN_TOOLS}; give custom tools as dicts"
                )
            spec = ToolSpec(t, True, None)
        elif isinstance(t, dict):
            if t.get("type") != "function":
                raise ValueError(f"tools[{i}].type must be 'function', got {t.get('type')!r}")
            fn = t.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ValueError(f"tools[{i}].function.name must be a non-empty string")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
            spec = ToolSpec(fn["name"], fn["name"] in BUILTIN_TOOLS, t)
        else:
            raise ValueError(f"tools[{i}] must be a dict or a built-in tool name, got {type(t).__name__}")
        if spec.name in seen:
            raise ValueError(f"tools[{i}]: tool {spec.name!r} is declared twice")
        seen.add(spec.name)
        out.append(spec)
    return out


# --------------------------------------------------------------------------------------------
# Building calls from candidate text
# --------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity: json.loads accepts them, JSON does not


def _json_loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None


def _args_json(args: dict) -> str | None:
    try:
        return json.dumps(args, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


_Call = tuple[str, str]  # (name, arguments as a JSON object string)


def _call_from_json(obj: Any, names: frozenset[str]) -> _Call | None:
    if not isinstance(obj, dict) or not set(obj) <= {"type", "name", "parameters", "arguments"}:
        return None
    if obj.get("type", "function") != "function" or ("parameters" in obj) == ("arguments" in obj):
        return None  # a call has exactly one of "parameters" / "arguments"
    name = obj.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    args = obj["parameters"] if "parameters" in obj else obj["arguments"]
    if isinstance(args, str):  # arguments given as a JSON string, OpenAI style
        args = _json_loads(args)
    if not isinstance(args, dict):
        return None
    encoded = _args_json(args)
    return None if encoded is None else (name, encoded)


def _python_call(node: ast.expr, names: frozenset[str], builtin_syntax: bool) -> _Call | None:
    """`name(k=v, ...)` (pythonic list element) or `name.call(k=v, ...)` (built-in syntax)."""
    if not isinstance(node, ast.Call) or node.args:
        return None
    func = node.func
    if builtin_syntax:
        if not (isinstance(func, ast.Attribute) and func.attr == "call" and isinstance(func.value, ast.Name)):
            return None
        name = func.value.id
    elif isinstance(func, ast.Name):
        name = func.id
    else:
        return None
    if name not in names:
        return None
    args = {}
    for kw in node.keywords:
        if kw.arg is None or kw.arg in args:  # **kwargs or a repeated keyword
            return None
        try:
            args[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    encoded = _args_json(args)
    return None if encoded is None else (name, encoded)


def _parse_python(text: str) -> ast.expr | None:
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


class _Brackets:
    """Finds where a bracketed span starting at `start` closes, resumably as text arrives.
    Strings are skipped (JSON: double quotes; Python: single or double)."""

    _PAIRS = {"{": "}", "[": "]", "(": ")"}

    def __init__(self, start: int, python: bool):
        self.i, self.stack, self.quote, self.escape = start, [], "", False
        self.quotes = "\"'" if python else '"'
        self.end: int | None = None

    def scan(self, buf: str) -> int | None:
        """End (exclusive) of the span; -1 if a bracket closes the wrong opener; None: not yet."""
        if self.end is not None:
            return self.end
        i, stack, quote, escape = self.i, self.stack, self.quote, self.escape
        while i < len(buf):
            ch = buf[i]
            i += 1
            if quote:
                if escape:
                    escape = False
                elif ch == "\\":
                    escape = True
                elif ch == quote:
                    quote = ""
            elif ch in self.quotes:
                quote = ch
            elif ch in self._PAIRS:
                stack.append(self._PAIRS[ch])
            elif ch in "}])":
                if not stack or stack.pop() != ch:
                    self.end = -1
                    return -1
                if not stack:
                    self.end = i
                    return i
        self.i, self.quote, self.escape = i, quote, escape
        return None


# --------------------------------------------------------------------------------------------
# The scanner
# --------------------------------------------------------------------------------------------

_NEED_MORE = None
_SPACES = re.compile(r"\s*")
_SEPARATORS = re.compile(r"[\s;]*")
_FUNCTION_NAME = re.compile(r"([\w.\-]*)(>?)")
_WORD = re.compile(r"\w*")
_CALL_KEYS = ("name", "type", "parameters", "arguments")


@dataclass
class _Outcome:
    calls: list[_Call]  # empty: not a call; the text up to `end` is content
    end: int


@dataclass
class _Scanner:
    names: frozenset[str]
    code_interpreter: bool
    buf: str = ""
    pos: int = 0
    after_call: bool = False
    stopped: bool = False
    events: list[tuple[str, Any]] = field(default_factory=list)  # ("content", str) | ("call", _Call)
    _brackets: tuple[int, _Brackets] | None = None

    def __post_init__(self) -> None:
        alternatives = [re.escape(PYTHON_TAG), re.escape(_FUNCTION_OPEN), r"[{\[]"]
        if self.names:
            names = "|".join(re.escape(n) for n in sorted(self.names, key=len, reverse=True))
            alternatives.append(rf"(?<!\w)(?:{names})\.call\(")
        self._candidate = re.compile("|".join(alternatives))
        self._markers = (PYTHON_TAG, _FUNCTION_OPEN, *STOP_MARKERS, *(f"{n}.call(" for n in self.names))

    # -- input --
    def feed(self, piece: str) -> None:
        if self.stopped or not piece:
            return
        start = max(0, len(self.buf) - max(map(len, STOP_MARKERS)))
        self.buf += piece
        cut = [i for i in (self.buf.find(m, start) for m in STOP_MARKERS) if i >= 0]
        if cut:
            self.buf = self.buf[: min(cut)]
            self.stopped = True

    def _emit_content(self, text: str) -> None:
        if text:
            self.events.append(("content", text))

    def _held_suffix(self) -> int:
        """Where the end of buf may be the start of a marker (len(buf) if it cannot)."""
        n = len(self.buf)
        hold = n
        for m in self._markers:
            for k in range(min(len(m) - 1, n - self.pos), 0, -1):
                if self.buf.endswith(m[:k]):
                    hold = min(hold, n - k)
                    break
        return hold

    # -- the loop --
    def advance(self, final: bool) -> None:
        final = final or self.stopped  # after a stop marker no more text can arrive
        buf = self.buf
        while True:
            if self.after_call:
                self.pos = _SEPARATORS.match(buf, self.pos).end()
                if self.pos == len(buf) and not final:
                    return
                self.after_call = False
            cand = self._candidate.search(buf, self.pos)
            limit = cand.start() if cand else len(buf)
            if not final:
                limit = min(limit, self._held_suffix())
            # Whitespace before a possible call is held until the call is decided.
            segment = buf[self.pos : limit]
            stripped = len(segment.rstrip())
            if final and cand is None:
                stripped = len(segment)
            self._emit_content(segment[:stripped])
            self.pos += stripped
            if cand is None or cand.start() > limit:
                if final:
                    self._emit_content(buf[self.pos :])
                    self.pos = len(buf)
                return
            out = self._resolve(cand, final)
            if out is _NEED_MORE:
                return
            self._brackets = None
            if out.calls:
                self.events.extend(("call", c) for c in out.calls)
                self.after_call = True
            else:
                self._emit_content(buf[self.pos : out.end])
            self.pos = out.end

    def _scan(self, start: int, python: bool) -> int | None:
        if self._brackets is None or self._brackets[0] != start:
            self._brackets = (start, _Brackets(start, python))
        return self._brackets[1].scan(self.buf)

    def _resolve(self, cand: re.Match, final: bool) -> _Outcome | None:
        buf, c, token = self.buf, cand.start(), cand.group()
        not_call = _Outcome([], c + 1)
        if token == PYTHON_TAG:
            return self._resolve_tagged(c) if final else _NEED_MORE
        if token.endswith(".call("):
            end = self._scan(cand.end() - 1, python=True)
            if end is None:
                return not_call if final else _NEED_MORE
            if end < 0:
                return not_call
            node = _parse_python(buf[c:end])
            call = _python_call(node, self.names, builtin_syntax=True) if node is not None else None
            return _Outcome([call] if call else [], end)
        if token == _FUNCTION_OPEN:
            return self._resolve_function_tag(c, final)
        # "{" or "[": the first key or function name tells a call apart from other brackets early.
        kind = self._opening(token, c)
        if kind == "more":
            return not_call if final else _NEED_MORE
        if kind == "no":
            return not_call
        python = kind == "python"
        end = self._scan(c, python=python)
        if end is None:
            return not_call if final else _NEED_MORE
        if end < 0:
            return not_call
        text = buf[c:end]
        if python:
            node = _parse_python(text)
            elts = node.elts if isinstance(node, ast.List) else []
            calls = [_python_call(e, self.names, builtin_syntax=False) for e in elts]
        else:
            obj = _json_loads(text)
            items = obj if isinstance(obj, list) else [obj]
            calls = [_call_from_json(o, self.names) for o in items] if obj is not None else []
        return _Outcome(calls if calls and all(calls) else [], end)

    def _opening(self, token: str, c: int) -> str:
        """How the bracket at `c` opens: "json" (an object whose first key is a call key, or a list
        of such), "python" (a list whose first item is `declared_name(`), "no", or "more" when
        the text so far cannot tell."""
        buf = self.buf
        i = _SPACES.match(buf, c + 1).end()
        if i == len(buf):
            return "more"
        if token == "[" and buf[i] == "{":
            return self._opening("{", i)
        if token == "{":
            if buf[i] != '"':
                return "no"
            j = buf.find('"', i + 1)
            if j < 0:
                key = buf[i + 1 :]
                return "more" if any(k.startswith(key) for k in _CALL_KEYS) else "no"
            return "json" if buf[i + 1 : j] in _CALL_KEYS else "no"
        m = _WORD.match(buf, i)
        name = m.group()
        if not name or not (name[0].isalpha() or name[0] == "_"):
            return "no"
        if m.end() == len(buf):
            return "more" if any(n.startswith(name) for n in self.names) else "no"
        if name not in self.names:
            return "no"
        k = _SPACES.match(buf, m.end()).end()
        if k == len(buf):
            return "more"
        return "python" if buf[k] == "(" else "no"

    def _resolve_function_tag(self, c: int, final: bool) -> _Outcome | None:
        buf = self.buf
        not_call = _Outcome([], c + 1)
        m = _FUNCTION_NAME.match(buf, c + len(_FUNCTION_OPEN))
        if not m.group(2):
            return not_call if final or m.end() < len(buf) else _NEED_MORE
        name = m.group(1)
        if name not in self.names:
            return not_call
        brace = _SPACES.match(buf, m.end()).end()
        if brace == len(buf):
            return not_call if final else _NEED_MORE
        if buf[brace] != "{":
            return not_call
        end = self._scan(brace, python=False)
        if end is None:
            return not_call if final else _NEED_MORE
        if end < 0:
            return not_call
        rest = buf[end : end + len(_FUNCTION_CLOSE)]
        if rest == _FUNCTION_CLOSE:
            close = end + len(_FUNCTION_CLOSE)
        elif _FUNCTION_CLOSE.startswith(rest) and end + len(rest) == len(buf) and not final:
            return _NEED_MORE  # the closing tag may still be arriving
        else:
            close = end
        args = _json_loads(buf[brace:end])
        call = _call_from_json({"name": name, "parameters": args}, self.names) if isinstance(args, dict) else None
        return _Outcome([call] if call else [], close)

    def _resolve_tagged(self, c: int) -> _Outcome:
        """Everything after <|python_tag|>: its calls, else code for code_interpreter, else content."""
        body = self.buf[c + len(PYTHON_TAG) :]
        inner = _Scanner(self.names, self.code_interpreter)
        inner.feed(body)
        inner.advance(final=True)
        has_call = any(kind == "call" for kind, _ in inner.events)
        if not has_call and self.code_interpreter and body.strip():
            code = json.dumps({"code": body.strip()}, ensure_ascii=False)
            inner.events = [("call", ("code_interpreter", code))]
            has_call = True
        if not has_call:  # the tag is dropped; the held whitespace before it stays content
            self._emit_content(self.buf[self.pos : c])
        self.events.extend(inner.events)
        self.pos = len(self.buf)
        return _Outcome([], self.pos)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _scanner(tools: list[dict | str] | None) -> _Scanner:
    specs = declared_tools(tools)
    names = frozenset(s.name for s in specs)
    return _Scanner(names, "code_interpreter" in names)


def _call_id(prefix: str, index: int) -> str:
    return f"call_{prefix}_{index}"


def parse_tool_calls(
    text: str, tools: list[dict | str] | None, *, id_prefix: str | None = None
) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a completed assistant message; content is None when empty.

    tool_calls are OpenAI dicts {"id", "type": "function", "function": {"name", "arguments"}} with
    ids `call_<id_prefix>_<index>` (a random prefix unless given)."""
    prefix = id_prefix if id_prefix is not None else uuid.uuid4().hex[:16]
    scanner = _scanner(tools)
    scanner.feed(text)
    scanner.advance(final=True)
    content = "".join(v for kind, v in scanner.events if kind == "content")
    calls = [v for kind, v in scanner.events if kind == "call"]
    tool_calls = [
        {"id": _call_id(prefix, i), "type": "function", "function": {"name": name, "arguments": args}}
        for i, (name, args) in enumerate(calls)
    ]
    return content or None, tool_calls


class StreamingToolParser:
    """Turns streamed assistant text into OpenAI chat-completion deltas.

    `feed(piece)` and `finish()` return lists of deltas: {"content": str}, and for each call
    {"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}
    followed by {"tool_calls": [{"index", "function": {"arguments": <JSON>}}]}. Text that may still
    become a call is held back until it is decided; a call is sent once it is complete. Joined,
    the deltas equal `parse_tool_calls` of the whole text (same ids for the same `id_prefix`)."""

    def __init__(self, tools: list[dict | str] | None, *, id_prefix: str | None = None):
        self._scanner = _scanner(tools)
        self._prefix = id_prefix if id_prefix is not None else uuid.uuid4().hex[:16]
        self._sent = 0  # events already turned into deltas
        self._n_calls = 0
        self._finished = False

    def feed(self, piece: str) -> list[dict]:
        if self._finished:
            raise RuntimeError("StreamingToolParser.feed after finish")
        self._scanner.feed(piece)
        self._scanner.advance(final=False)
        return self._deltas()

    def finish(self) -> list[dict]:
        if self._finished:
            return []
        self._finished = True
        self._scanner.advance(final=True)
        return self._deltas()

    def _deltas(self) -> list[dict]:
        out: list[dict] = []
        for kind, value in self._scanner.events[self._sent :]:
            if kind == "content":
                if out and "content" in out[-1]:
                    out[-1]["content"] += value
                else:
                    out.append({"content": value})
                continue
            name, args = value
            i = self._n_calls
            self._n_calls += 1
            out.append({"tool_calls": [{"index": i, "id": _call_id(self._prefix, i), "type": "function",
                                        "function": {"name": name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": i, "function": {"arguments": args}}]})
        self._sent = len(self._scanner.events)
        return out
