"""Tool-call decoding: the call forms, agreement with Meta's llama-models decoder and encoder,
streaming == non-streaming for any split (hypothesis), and regressions other servers' users hit."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_jax.tool_calls import StreamingToolParser, declared_tools, parse_tool_calls


def fn(name: str, **props: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in props.items()}}}}


CUSTOM = ["get_weather", "trending_songs", "f"]
TOOLS = [fn("get_weather", city="string"), fn("trending_songs", n="integer"), fn("f"),
         "brave_search", "wolfram_alpha", "code_interpreter"]


def calls_of(text: str, tools=TOOLS) -> tuple[str | None, list[tuple[str, dict]]]:
    content, calls = parse_tool_calls(text, tools)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def run_stream(pieces: list[str], tools=TOOLS, id_prefix: str = "t") -> tuple[str | None, list[dict], list[dict]]:
    """Feed pieces; rebuild (content, tool_calls) from the deltas the way an OpenAI client does."""
    parser = StreamingToolParser(tools, id_prefix=id_prefix)
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    content = "".join(d["content"] for d in deltas if "content" in d)
    calls: dict[int, dict] = {}
    for d in deltas:
        assert set(d) <= {"content", "tool_calls"}
        for tc in d.get("tool_calls", []):
            if "id" in tc:
                assert tc["index"] not in calls and tc["type"] == "function" and tc["function"]["arguments"] == ""
                calls[tc["index"]] = {"id": tc["id"], "type": "function",
                                      "function": {"name": tc["function"]["name"], "arguments": ""}}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return content or None, [calls[i] for i in range(len(calls))], deltas


# --------------------------------------------------------------------------------------------
# Call forms
# --------------------------------------------------------------------------------------------

EXAMPLES = [
    # (model output, expected content, expected calls)
    ('<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>', None,
     [("brave_search", {"query": "latest price of 1oz gold"})]),
    ('<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")', None,
     [("wolfram_alpha", {"query": "100th decimal of pi"})]),
    ("<|python_tag|>def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))<|eom_id|>", None,
     [("code_interpreter", {"code": "def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))"})]),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n        "n": "10"\n'
     '    }\n}<|eom_id|>', None, [("trending_songs", {"n": "10"})]),
    ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),
    ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}', None, [("get_weather", {"city": "Oslo"})]),
    ('{"name": "f", "parameters": {"a": {"b": {"c": [1, {"d": [true, null, 2.5]}]}}}}', None,
     [("f", {"a": {"b": {"c": [1, {"d": [True, None, 2.5]}]}}})]),
    ('{"name": "f", "parameters": {"x": 1}}; {"name": "get_weather", "parameters": {"city": "Rome"}}', None,
     [("f", {"x": 1}), ("get_weather", {"city": "Rome"})]),
    ('[{"name": "f", "parameters": {}}, {"name": "trending_songs", "parameters": {"n": 3}}]', None,
     [("f", {}), ("trending_songs", {"n": 3})]),
    ('<function=get_weather>{"city": "Lima"}</function><|eot_id|>', None, [("get_weather", {"city": "Lima"})]),
    ('[get_weather(city="Rome"), trending_songs(n=5), f()]', None,
     [("get_weather", {"city": "Rome"}), ("trending_songs", {"n": 5}), ("f", {})]),
    ('Let me look that up.\n\n<|python_tag|>brave_search.call(query="x")', "Let me look that up.",
     [("brave_search", {"query": "x"})]),
    ('Sure: {"name": "f", "parameters": {}} and then some text.', "Sure:and then some text.", [("f", {})]),
    ('{"name": "John", "age": 30}', '{"name": "John", "age": 30}', []),
    ('{"name": "get_weather", "city": "Paris"}', '{"name": "get_weather", "city": "Paris"}', []),
    ('{"name": "unknown_tool", "parameters": {}}', '{"name": "unknown_tool", "parameters": {}}', []),
    ('{"name": "get_weather", "parameters": {"city": "Par', '{"name": "get_weather", "parameters": {"city": "Par', []),
    ('{"name": "f", "parameters": {"x": [1}}', '{"name": "f", "parameters": {"x": [1}}', []),
    ("if (x) { y(); } [1] [link](url) <b>", "if (x) { y(); } [1] [link](url) <b>", []),
    ("Plain answer.<|eot_id|>", "Plain answer.", []),
    ("<|python_tag|>", None, []),
]


@pytest.mark.parametrize(("text", "content", "calls"), EXAMPLES)
def test_examples(text, content, calls):
    assert calls_of(text) == (content, calls)
    got_content, got_calls, _ = run_stream(list(text))  # one character at a time
    assert (got_content, got_calls) == parse_tool_calls(text, TOOLS, id_prefix="t")


def test_openai_shape_and_ids():
    content, calls = parse_tool_calls('{"name": "f", "parameters": {}};{"name": "f", "parameters": {"a": 1}}',
                                      TOOLS, id_prefix="abc")
    assert content is None
    assert calls == [
        {"id": "call_abc_0", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "call_abc_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
    ]
    _, random_ids = parse_tool_calls('{"name": "f", "parameters": {}}', TOOLS)
    assert random_ids[0]["id"].startswith("call_") and random_ids[0]["id"] != "call_abc_0"


def test_only_declared_tools_are_calls():
    text = '<|python_tag|>brave_search.call(query="x")'
    assert calls_of(text, None) == ('brave_search.call(query="x")', [])
    assert calls_of(text, [fn("f")]) == ('brave_search.call(query="x")', [])
    assert calls_of("<|python_tag|>print(1)", ["brave_search"]) == ("print(1)", [])
    assert calls_of('{"name": "f", "parameters": {}}', []) == ('{"name": "f", "parameters": {}}', [])


def test_declared_tools_validation():
    assert [(s.name, s.builtin) for s in declared_tools(TOOLS)] == [
        ("get_weather", False), ("trending_songs", False), ("f", False),
        ("brave_search", True), ("wolfram_alpha", True), ("code_interpreter", True)]
    for bad, match in [({"type": "function"}, r"tools\[0\]\.function\.name"), ("search", r"tools\[0\]"),
                       (3, r"tools\[0\] must be")]:
        with pytest.raises(ValueError, match=match):
            declared_tools([bad])
    with pytest.raises(ValueError, match="declared twice"):
        declared_tools(["brave_search", "brave_search"])


# --------------------------------------------------------------------------------------------
# Against Meta's llama-models
# --------------------------------------------------------------------------------------------

SAFE_TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ABC0123456789.,?!-_éü中🎉", min_size=1, max_size=20)
SAFE_TEXT = SAFE_TEXT.filter(lambda s: s.strip() == s)
FLAT = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), SAFE_TEXT)
IDENT = st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(query=SAFE_TEXT, tool=st.sampled_from(["brave_search", "wolfram_alpha"]), eom=st.booleans())
def test_builtin_call_agrees_with_meta_decoder(query, tool, eom):
    from llama_models.datatypes import StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    text = f'<|python_tag|>{tool}.call(query="{query}")' + ("<|eom_id|>" if eom else "")
    meta = ChatFormat(Tokenizer.get_instance()).decode_assistant_message_from_content(text, StopReason.end_of_turn)
    (call,) = meta.tool_calls
    assert calls_of(text) == (None, [(call.tool_name.value, call.arguments)])


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(CUSTOM), args=st.dictionaries(IDENT, FLAT, max_size=4), tagged=st.booleans())
def test_json_call_agrees_with_meta_decoder(name, args, tagged):
    from llama_models.datatypes import StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    text = ("<|python_tag|>" if tagged else "") + json.dumps({"type": "function", "name": name, "parameters": args})
    meta = ChatFormat(Tokenizer.get_instance()).decode_assistant_message_from_content(text, StopReason.end_of_turn)
    (call,) = meta.tool_calls
    assert calls_of(text) == (None, [(call.tool_name, call.arguments)])


@settings(max_examples=60, deadline=None)
@given(code=st.text(alphabet="abcxyz0123 =+()\n:'\"#", min_size=1, max_size=40).filter(lambda s: s.strip() == s))
def test_code_agrees_with_meta_decoder(code):
    from llama_models.datatypes import StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    text = "<|python_tag|>" + code + "<|eom_id|>"
    meta = ChatFormat(Tokenizer.get_instance()).decode_assistant_message_from_content(text, StopReason.end_of_turn)
    if meta.tool_calls and meta.tool_calls[0].tool_name.value == "code_interpreter":
        assert calls_of(text, ["code_interpreter"]) == (None, [("code_interpreter", meta.tool_calls[0].arguments)])


@settings(max_examples=80, deadline=None)
@given(
    calls=st.lists(st.tuples(st.sampled_from(CUSTOM), st.dictionaries(IDENT, FLAT, max_size=3)),
                   min_size=1, max_size=3),
    fmt=st.sampled_from(["json", "function_tag", "python_list"]),
)
def test_meta_encoded_calls_round_trip(calls, fmt):
    """Calls written by Meta's ToolUtils.encode_tool_call, in each of its formats, parse back.
    (Meta writes python_list strings unescaped; SAFE_TEXT has no quotes or backslashes.)"""
    from llama_models.datatypes import ToolCall, ToolPromptFormat
    from llama_models.llama3.tool_utils import ToolUtils

    texts = [ToolUtils.encode_tool_call(ToolCall(call_id="i", tool_name=n, arguments=a), ToolPromptFormat(fmt))
             for n, a in calls]
    assert calls_of("; ".join(texts)) == (None, calls)


# --------------------------------------------------------------------------------------------
# Streaming == non-streaming, and never raising
# --------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
ARGS = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3)
NOISE = st.lists(st.sampled_from(list("ab {}[]()\"':;,<>|=_.\\\n\t5é🎉") + [
    "<|python_tag|>", "<function=", "</function>", "<|eot_id|>", "<|eom_id|>", "brave_search.call(", "get_weather(",
    '{"name": ', '"parameters": ', "<|"]), max_size=25).map("".join)


@st.composite
def call_text(draw) -> str:
    name = draw(st.sampled_from(CUSTOM + ["unknown", "brave_search"]))
    args = draw(ARGS)
    form = draw(st.sampled_from(["json", "json_args", "json_list", "tag", "builtin", "pythonic", "code"]))
    if form == "json":
        return json.dumps({"name": name, "parameters": args}, indent=draw(st.sampled_from([None, 2])))
    if form == "json_args":
        return json.dumps({"type": "function", "name": name, "arguments": args}, ensure_ascii=draw(st.booleans()))
    if form == "json_list":
        return json.dumps([{"name": name, "parameters": args}, {"name": "f", "parameters": {}}])
    if form == "tag":
        return f"<function={name}>{json.dumps(args)}</function>"
    if form == "builtin":
        return f'<|python_tag|>brave_search.call(query="{draw(SAFE_TEXT)}")'
    if form == "pythonic":
        kw = draw(st.dictionaries(IDENT, FLAT, max_size=2))
        return "[" + ", ".join([f"{name}({', '.join(f'{k}={v!r}' for k, v in kw.items())})", "f()"]) + "]"
    return "<|python_tag|>" + draw(NOISE)


@st.composite
def model_output(draw) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["call", "call", "noise", "truncated"]))
        text = draw(call_text()) if kind != "noise" else draw(NOISE)
        if kind == "truncated":
            text = text[: draw(st.integers(0, len(text)))]
        parts.append(text)
        parts.append(draw(st.sampled_from(["", " ", "; ", ";", "\n\n", " and "])))
    return "".join(parts) + draw(st.sampled_from(["", "<|eom_id|>", "<|eot_id|>", " "]))


@st.composite
def splits(draw, text: str) -> list[str]:
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_streaming_equals_non_streaming(data):
    text = data.draw(model_output())
    pieces = data.draw(splits(text))
    expected = parse_tool_calls(text, TOOLS, id_prefix="t")
    content, calls, _ = run_stream(pieces)
    assert (content, calls) == expected
    for c in calls:
        json.loads(c["function"]["arguments"])  # arguments are always a complete JSON object


@settings(max_examples=120, deadline=None)
@given(text=st.text(max_size=80) | NOISE, data=st.data())
def test_random_text_never_raises(text, data):
    for tools in (TOOLS, None, ["code_interpreter"]):
        content, calls = parse_tool_calls(text, tools, id_prefix="t")
        assert isinstance(calls, list)
        assert run_stream(data.draw(splits(text)), tools)[:2] == (content, calls)


@settings(max_examples=100, deadline=None)
@given(calls=st.lists(st.tuples(st.sampled_from(CUSTOM), ARGS), min_size=1, max_size=4),
       sep=st.sampled_from(["; ", ";", "\n", " "]), tag=st.booleans())
def test_json_calls_round_trip(calls, sep, tag):
    text = ("<|python_tag|>" if tag else "") + sep.join(json.dumps({"name": n, "parameters": a}) for n, a in calls)
    assert calls_of(text) == (None, calls)


# --------------------------------------------------------------------------------------------
# Regressions reported against other servers' Llama 3 parsers
# --------------------------------------------------------------------------------------------


def test_nested_arguments_are_kept():
    args = {"filter": {"and": [{"field": "a", "op": "=", "value": {"nested": {"deep": [1, 2, {"x": "}"}]}}}]}}
    text = json.dumps({"name": "f", "parameters": args})
    assert calls_of(text) == (None, [("f", args)])
    assert run_stream([text[:17], text[17:40], text[40:]])[1][0]["function"]["arguments"] == json.dumps(args)


def test_semicolon_separated_calls_are_all_returned():
    text = '{"name": "get_weather", "parameters": {"city": "A"}}; {"name": "get_weather", "parameters": {"city": "B"}}'
    assert [c[1]["city"] for c in calls_of(text)[1]] == ["A", "B"]
    assert len(run_stream(text.split(";"))[1]) == 2


def test_plain_json_content_is_not_eaten():
    for text in ['{"name": "Alice", "parameters": "none"}', '[{"name": "x"}]', '{"result": {"name": "f"}}',
                 'Here is JSON: {"name": "get_weather"} as an example']:
        assert calls_of(text) == (text, [])
        assert run_stream([text])[:2] == (text, [])


def test_final_argument_fragment_is_flushed():
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    parser = StreamingToolParser(TOOLS, id_prefix="t")
    deltas = [d for ch in text[:-1] for d in parser.feed(ch)]
    assert deltas == []  # nothing is decided before the closing brace
    last = parser.feed(text[-1])
    assert [d["tool_calls"][0]["function"] for d in last] == [{"name": "get_weather", "arguments": ""},
                                                              {"arguments": '{"city": "Paris"}'}]
    assert parser.finish() == []


def test_streaming_and_whole_agree_on_split_markers():
    cases = [
        ['<|pyth', 'on_tag|>brave_search.ca', 'll(query="a b")<|eo', 'm_id|>'],
        ['<function=get_', 'weather>{"city": "X"}</fun', 'ction>'],
        ['Answer: ', '{', '"name": "f", "parameters": {}', '}', ' done'],
        ['[get_weather(city="Y"', '), f(', ')]'],
        ['{"name": "f", "parameters": {"s": "a \\"quoted\\" }"}', '}'],
    ]
    for pieces in cases:
        text = "".join(pieces)
        assert run_stream(pieces)[:2] == parse_tool_calls(text, TOOLS, id_prefix="t"), pieces
        assert parse_tool_calls(text, TOOLS)[1], pieces  # each one holds a call


def test_content_streams_without_waiting_for_the_end():
    parser = StreamingToolParser(TOOLS)
    assert parser.feed("Hello there, ") == [{"content": "Hello there,"}]  # the trailing space waits
    assert parser.feed("friend.") == [{"content": " friend."}]
    assert parser.feed(" {not a call}") == [{"content": " {not a call}"}]
    assert parser.finish() == []


def test_eom_is_a_stop_and_is_stripped():
    from llama_jax.tokenizer import llama3_tokenizer

    tok = llama3_tokenizer()
    assert tok.token_id("<|eom_id|>") in tok.stop_ids and tok.token_id("<|eot_id|>") in tok.stop_ids
    for end in ("<|eom_id|>", "<|eot_id|>", "<|end_of_text|>"):
        expected = (None, [("brave_search", {"query": "q"})])
        assert calls_of(f'<|python_tag|>brave_search.call(query="q"){end}') == expected
        assert calls_of(f"Done.{end}ignored") == ("Done.", [])
        assert run_stream(["Done.", end[:4], end[4:], "ignored"])[:2] == ("Done.", [])
