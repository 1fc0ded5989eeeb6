"""Chat formats against their references: Meta's llama-models (ChatFormat.encode_dialog_prompt and
the rendered examples of its Llama 3.1 prompt_format.md), the Llama 3.1 Hugging Face template's
behaviour, and transformers' apply_chat_template for a checkpoint's own Jinja template."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
from pathlib import Path

import pytest

from llama_jax.chat_format import (
    ChatFormat,
    ChatTemplateError,
    JinjaChatFormat,
    chat_format_for,
    read_chat_template,
    tools_to_parse,
)
from llama_jax.tokenizer import llama3_tokenizer, load_tokenizer

MD_DATE = dt.date(2024, 9, 21)  # the date Meta's prompt_format.md was rendered on


@pytest.fixture(scope="module")
def tok():
    return llama3_tokenizer()


@pytest.fixture(scope="module")
def meta_format():
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    return MetaChatFormat(Tokenizer.get_instance())


def fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": required}}}


TRENDING = fn(
    "trending_songs", "Returns the trending songs on a Music site",
    {"n": {"type": "int", "description": "The number of songs to return"},
     "genre": {"type": "str", "description": "The genre of the songs to return"}},
    ["n"],
)
WEATHER = fn("get_weather", "Weather in a city", {"city": {"type": "string", "description": "City name"},
                                                  "unit": {"type": "string", "description": "c or f"}}, ["city"])
BUILTINS = ["code_interpreter", "brave_search", "wolfram_alpha"]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}

# --------------------------------------------------------------------------------------------
# Meta: the installed prompt_format.md examples, and ChatFormat.encode_dialog_prompt
# --------------------------------------------------------------------------------------------

_MESSAGE = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(<\|eot_id\|>|<\|eom_id\|>)", re.S)


def md_blocks() -> list[str]:
    """The "Input Prompt Format" blocks of llama-models' Llama 3.1 prompt_format.md (each one is
    Meta's tokenizer.decode of the prompt tokens its reference code built)."""
    spec = importlib.util.find_spec("llama_models")
    text = (Path(next(iter(spec.submodule_search_locations))) / "llama3_1" / "prompt_format.md").read_text()
    return re.findall(r"##### Input Prompt Format\n```\n(.*?)\n```", text, re.S)


def raw_messages(rendered: str) -> list:
    """Meta RawMessages for the system/user/tool messages of a rendered prompt."""
    from llama_models.datatypes import RawMessage

    return [RawMessage(role="tool" if r == "ipython" else r, content=c) for r, c, _ in _MESSAGE.findall(rendered)]


def meta_ids(meta_format, messages: list, add_generation_prompt: bool = True) -> list[int]:
    """Meta's tokens, message by message (encode_dialog_prompt's loop). Meta's current ChatFormat
    puts <|python_tag|> only before code_interpreter calls; Llama 3.1 (prompt_format.md, the HF
    template) has it before every built-in call, which is what ChatFormat(style="meta") renders, so
    it is inserted here for brave_search / wolfram_alpha calls."""
    from llama_models.datatypes import BuiltinTool, ToolPromptFormat

    tokens = [128000]
    for m in messages:
        toks, _ = meta_format.encode_message(m, ToolPromptFormat.json)
        if m.role == "assistant" and m.tool_calls and m.tool_calls[0].tool_name in (
            BuiltinTool.brave_search, BuiltinTool.wolfram_alpha
        ):
            n = len(meta_format._encode_header("assistant"))
            toks = toks[:n] + [128010] + toks[n:]
        tokens += toks
    if add_generation_prompt:
        tokens += meta_format._encode_header("assistant")
    return tokens


def test_md_builtin_tools(tok, meta_format):
    block = md_blocks()[2]
    dialog = [SYSTEM, {"role": "user", "content": "Search the web for the latest price of 1oz gold?"}]
    cf = ChatFormat(tok, today=MD_DATE)
    assert cf.render(dialog, BUILTINS) == block
    assert cf.encode_dialog(dialog, BUILTINS) == meta_ids(meta_format, raw_messages(block))


def test_md_json_custom_tools(tok, meta_format):
    block = md_blocks()[5]
    dialog = [SYSTEM, {"role": "user", "content": "Use tools to get latest trending songs"}]
    cf = ChatFormat(tok, today=MD_DATE)
    assert cf.render(dialog, [TRENDING]) == block
    assert cf.encode_dialog(dialog, [TRENDING]) == meta_ids(meta_format, raw_messages(block))


def test_md_function_tag_custom_tools(tok, meta_format):
    block = md_blocks()[6]
    dialog = [SYSTEM, {"role": "user", "content": "Use tools to get latest trending songs"}]
    cf = ChatFormat(tok, today=MD_DATE, tool_prompt_format="function_tag")
    assert cf.render(dialog, [TRENDING]) == block
    assert cf.encode_dialog(dialog, [TRENDING]) == meta_ids(meta_format, raw_messages(block))


def test_md_builtin_call_and_result(tok):
    """The full built-in interaction: <|python_tag|>wolfram_alpha.call(...)<|eom_id|> and the
    result under the ipython header (compared after the example's hand-written system message)."""
    block = md_blocks()[4]
    result = _MESSAGE.findall(block)[-1][1]
    dialog = [
        {"role": "user", "content": "What is the 100th decimal of pi?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "wolfram_alpha", "arguments": '{"query": "100th decimal of pi"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": result},
    ]
    rendered = ChatFormat(tok, today=MD_DATE).render(dialog, ["brave_search", "wolfram_alpha"])
    tail = block[block.index("<|start_header_id|>user"):]
    assert rendered.endswith(tail)


def test_md_plain_dialogs_after_system(tok):
    for i in (1, 3):
        block = md_blocks()[i]
        (_, user, _), = [m for m in _MESSAGE.findall(block) if m[0] == "user"]
        rendered = ChatFormat(tok).render([{"role": "user", "content": user}])
        assert rendered.endswith(block[block.index("<|start_header_id|>user"):])


def to_meta(messages: list[dict]) -> list:
    """OpenAI-style messages as Meta RawMessages; a tool-calling assistant message ends its
    turn with <|eom_id|> (stop_reason end_of_message), as Llama 3.1 does in an ipython environment."""
    from llama_models.datatypes import BuiltinTool, RawMessage, RawTextItem, StopReason, ToolCall

    def tool_name(name: str):
        return BuiltinTool(name) if name in BuiltinTool.__members__ else name

    out = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):
            content = [RawTextItem(text=p["text"]) for p in content]
        # model_construct: Meta's pydantic type allows only one level of nesting in arguments,
        # while its encoder (json.dumps) handles any depth.
        calls = [
            ToolCall.model_construct(call_id=c.get("id", "x"), tool_name=tool_name(c["function"]["name"]),
                                     arguments=json.loads(c["function"]["arguments"]), arguments_json=None)
            for c in m.get("tool_calls") or []
        ]
        stop = StopReason.end_of_message if calls else StopReason.end_of_turn
        role = "tool" if m["role"] == "ipython" else m["role"]
        out.append(RawMessage(role=role, content=content, tool_calls=calls, stop_reason=stop))
    return out


def call(name: str, args: dict, call_id: str = "c0") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


DIALOGS = {
    "multi_turn": (None, [
        SYSTEM, {"role": "user", "content": "Hi! Wie geht's?"}, {"role": "assistant", "content": "Gut, danke. 🎉"},
        {"role": "user", "content": "  Und dir?  \n"},
    ]),
    "no_system": (None, [{"role": "user", "content": "नमस्ते <|eot_id|> is plain text here"}]),
    "late_system": (None, [
        SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "system", "content": "From now on, answer in French."}, {"role": "user", "content": "Bye"},
    ]),
    "custom_calls": ([WEATHER, TRENDING], [
        SYSTEM, {"role": "user", "content": "Weather in Paris and Zürich, and top songs?"},
        {"role": "assistant", "content": None, "tool_calls": [
            call("get_weather", {"city": "Paris", "opts": {"deep": [1, {"x": None}], "ü": "ß"}}, "a"),
            call("trending_songs", {"n": 3}, "b")]},
        {"role": "tool", "tool_call_id": "a", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "b", "content": '["s1", "s2", "s3"]'},
        {"role": "assistant", "content": "Paris is 21°C; top songs: s1, s2, s3."},
        {"role": "user", "content": "Thanks"},
    ]),
    "builtin_search": (["brave_search", "wolfram_alpha"], [
        {"role": "user", "content": "Who won the 2024 NBA finals?"},
        {"role": "assistant", "content": "", "tool_calls": [call("brave_search", {"query": "2024 NBA finals winner"})]},
        {"role": "ipython", "content": '{"results": ["Boston Celtics"]}'},
        {"role": "assistant", "content": "The Boston Celtics."},
    ]),
    "code_interpreter": (["code_interpreter"], [
        SYSTEM, {"role": "user", "content": "Is 7 prime?"},
        {"role": "assistant",
         "tool_calls": [call("code_interpreter", {"code": "def p(n):\n    return n > 1\nprint(p(7))"})]},
        {"role": "tool", "content": "True"},
    ]),
    "content_and_call": ([WEATHER], [
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Oslo?"}]},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", {"city": "Oslo"})]},
        {"role": "tool", "content": "cold"},
    ]),
}


@pytest.mark.parametrize("name", DIALOGS)
@pytest.mark.parametrize("gen", [True, False])
def test_dialogs_match_meta_chat_format(tok, meta_format, name, gen):
    """Token-for-token equal to Meta's ChatFormat: headers, content, tool calls, tool results,
    <|eom_id|>/<|eot_id|>, generation prompt. The system message (and the custom-tool user
    message) Meta gets are the ones rendered here, which the prompt_format.md tests check."""
    tools, dialog = DIALOGS[name]
    cf = ChatFormat(tok, today=dt.date(2025, 3, 5))
    rendered = cf.render(dialog, tools, add_generation_prompt=gen)
    n_prologue = 2 if any(isinstance(t, dict) for t in tools or []) else 1
    prologue = raw_messages(rendered)[:n_prologue]
    rest = dialog[1:] if dialog[0]["role"] == "system" else dialog
    expected = meta_ids(meta_format, prologue + to_meta(rest), add_generation_prompt=gen)
    assert cf.encode_dialog(dialog, tools, add_generation_prompt=gen) == expected
    assert tok.decode(expected) == rendered


def test_function_tag_call_history_matches_meta(tok, meta_format):
    from llama_models.datatypes import ToolPromptFormat

    dialog = [{"role": "user", "content": "Songs?"},
              {"role": "assistant", "tool_calls": [call("trending_songs", {"n": 10})]},
              {"role": "tool", "content": "[]"}]
    cf = ChatFormat(tok, today=MD_DATE, tool_prompt_format="function_tag")
    rendered = cf.render(dialog, [TRENDING])
    meta_dialog = raw_messages(rendered)[:2] + to_meta(dialog)
    expected = meta_format.encode_dialog_prompt(meta_dialog, ToolPromptFormat.function_tag)
    assert cf.encode_dialog(dialog, [TRENDING]) == expected.tokens
    assert "<function=trending_songs>{\"n\": 10}</function><|eom_id|>" in rendered


def test_meta_system_prompt(tok):
    cf = ChatFormat(tok, today=dt.date(2026, 11, 3))
    rendered = cf.render([{"role": "user", "content": "x"}])
    assert rendered.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 03 November 2026\n<|eot_id|>"
    )
    # Only code_interpreter: the environment line without a Tools line.
    assert "\n\nEnvironment: ipython\n\nCutting Knowledge" in cf.render([{"role": "user", "content": "x"}],
                                                                        ["code_interpreter"])
    today = dt.date.today()
    month = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
             "November", "December")[today.month - 1]  # English whatever the locale
    assert f"Today Date: {today.day:02d} {month} {today.year}" in ChatFormat(tok).render([SYSTEM])


def test_tools_in_system(tok):
    for style in ("meta", "hf"):
        cf = ChatFormat(tok, style=style, tools_in_system=True, today=MD_DATE)
        rendered = cf.render([SYSTEM, {"role": "user", "content": "Weather?"}], [WEATHER])
        messages = _MESSAGE.findall(rendered)
        assert [m[0] for m in messages] == ["system", "user"]
        assert '"get_weather"' in messages[0][1] and messages[0][1].rstrip().endswith("You are a helpful assistant.")
        assert messages[1][1] == "Weather?"


def test_llama31_template_kwargs(tok):
    """chat_template_kwargs: the Hugging Face template's variables, for one call, in both styles."""
    dialog = [SYSTEM, {"role": "user", "content": "Weather?"}]
    for style in ("meta", "hf"):
        cf = ChatFormat(tok, style=style, today=MD_DATE)
        in_system = ChatFormat(tok, style=style, today=MD_DATE, tools_in_system=True)
        assert (cf.render(dialog, [WEATHER], chat_template_kwargs={"tools_in_user_message": False})
                == in_system.render(dialog, [WEATHER]))
        assert (in_system.render(dialog, [WEATHER], chat_template_kwargs={"tools_in_user_message": True})
                == cf.render(dialog, [WEATHER]))
        builtin = {"builtin_tools": ["wolfram_alpha", "brave_search"]}
        assert (cf.encode_dialog(dialog, [WEATHER, "brave_search"], chat_template_kwargs=builtin)
                == cf.encode_dialog(dialog, ["wolfram_alpha", "brave_search", WEATHER]))
        assert "Tools: wolfram_alpha, brave_search\n" in cf.render(dialog, chat_template_kwargs=builtin)
        # The date as given; variables the template does not read are ignored, as a template would.
        dated = cf.render(dialog, chat_template_kwargs={"date_string": "1 April 2030", "enable_thinking": False})
        assert "Today Date: 1 April 2030\n" in dated
        assert dated == ChatFormat(tok, style=style, today=dt.date(2030, 4, 1)).render(dialog).replace(
            "01 Apr" if style == "hf" else "01 April", "1 April")
        assert cf.tools_in_system is False and cf.date_string is None  # one call's, not the format's
    cf = ChatFormat(tok, style="hf")
    for kwargs, match in [({"tools_in_user_message": "no"}, "tools_in_user_message must be a boolean"),
                          ({"date_string": 20240726}, "date_string must be a string"),
                          ({"builtin_tools": ["calculator"]}, "builtin_tools must be a list of"),
                          ({"builtin_tools": "brave_search"}, "builtin_tools must be a list of")]:
        with pytest.raises(ValueError, match=match):
            cf.encode_dialog(dialog, chat_template_kwargs=kwargs)


def test_tools_to_parse():
    assert tools_to_parse([WEATHER], None) == [WEATHER]
    assert tools_to_parse(None, {"date_string": "x"}) is None
    assert tools_to_parse([WEATHER, "brave_search"], {"builtin_tools": ["brave_search", "code_interpreter", 3]}) == [
        WEATHER, "brave_search", "code_interpreter"]
    assert tools_to_parse(None, {"builtin_tools": ["wolfram_alpha", "wolfram_alpha"]}) == ["wolfram_alpha"]


# --------------------------------------------------------------------------------------------
# The Hugging Face Llama 3.1 template's behaviour (style="hf")
# --------------------------------------------------------------------------------------------

H = "<|start_header_id|>{}<|end_header_id|>\n\n"


def test_hf_plain_dialog(tok):
    cf = ChatFormat(tok, style="hf", today=dt.date(2024, 7, 26))
    dialog = [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": " Hi \n"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    expected = ("<|begin_of_text|>" + H.format("system")
                + "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
                + H.format("user") + "Hi<|eot_id|>" + H.format("assistant") + "Hello.<|eot_id|>"
                + H.format("user") + "Bye<|eot_id|>" + H.format("assistant"))
    assert cf.render(dialog) == expected
    # The template is one string, tokenized as a whole with its special tokens.
    assert cf.encode_dialog(dialog) == tok.encode(expected, allow_special=True)
    no_system = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
    assert cf.render(dialog[1:2]).startswith("<|begin_of_text|>" + H.format("system") + no_system)

    # A system message later in the dialog (OpenAI and the template take one anywhere) is a turn of its own
    # (Meta's format: DIALOGS' late_system).
    late = [*dialog[1:3], {"role": "system", "content": " Now in French. "}, dialog[3]]
    assert cf.render(late).endswith(H.format("assistant") + "Hello.<|eot_id|>" + H.format("system")
                                    + "Now in French.<|eot_id|>" + H.format("user") + "Bye<|eot_id|>"
                                    + H.format("assistant"))


def test_hf_tools(tok):
    cf = ChatFormat(tok, style="hf", today=dt.date(2024, 9, 1))
    dialog = [{"role": "user", "content": "Weather in Paris? "},
              {"role": "assistant", "content": "ignored", "tool_calls": [call("get_weather", {"city": "Paris"})]},
              {"role": "tool", "content": "21 C"}]
    rendered = cf.render(dialog, [WEATHER])
    expected = (
        "<|begin_of_text|>" + H.format("system") + "Environment: ipython\nCutting Knowledge Date: December 2023\n"
        "Today Date: 01 Sep 2024\n\n<|eot_id|>" + H.format("user")
        + "Given the following functions, please respond with a JSON for a function call with its proper arguments "
        "that best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": "
        "dictionary of argument name and its value}.Do not use variables.\n\n"
        + json.dumps(WEATHER, indent=4) + "\n\nWeather in Paris?<|eot_id|>"
        + H.format("assistant") + '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        + H.format("ipython") + '"21 C"<|eot_id|>' + H.format("assistant")
    )
    assert rendered == expected
    assert cf.encode_dialog(dialog, [WEATHER]) == tok.encode(expected, allow_special=True)


def test_hf_builtin_tools(tok):
    cf = ChatFormat(tok, style="hf", today=dt.date(2024, 9, 1))
    dialog = [{"role": "user", "content": "News?"},
              {"role": "assistant", "tool_calls": [call("brave_search", {"query": "news"})]}]
    rendered = cf.render(dialog, ["brave_search", "code_interpreter"], add_generation_prompt=False)
    assert rendered == ("<|begin_of_text|>" + H.format("system") + "Environment: ipython\nTools: brave_search\n\n"
                        "Cutting Knowledge Date: December 2023\nToday Date: 01 Sep 2024\n\n<|eot_id|>"
                        + H.format("user") + "News?<|eot_id|>" + H.format("assistant")
                        + '<|python_tag|>brave_search.call(query="news")<|eom_id|>')


def test_hf_limits(tok):
    cf = ChatFormat(tok, style="hf")
    two = {"role": "assistant", "tool_calls": [call("get_weather", {"city": "a"}), call("get_weather", {"city": "b"})]}
    with pytest.raises(ValueError, match="one tool call"):
        cf.encode_dialog([{"role": "user", "content": "x"}, two], [WEATHER])
    with pytest.raises(ValueError, match="first user message"):
        cf.encode_dialog([SYSTEM], [WEATHER])
    with pytest.raises(ValueError, match="JSON tool prompt"):
        ChatFormat(tok, style="hf", tool_prompt_format="function_tag")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("messages", "tools", "match"), [
    ([], None, "non-empty list"),
    ([{"role": "robot", "content": "x"}], None, r"messages\[0\]\.role: unknown role 'robot'"),
    ([{"role": "user"}], None, r"messages\[0\]\.content is missing"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}], None, r"messages\[1\]\.content"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}], None,
     r"messages\[1\]: a tool message must follow an assistant message with tool_calls"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}], None, r"messages\[0\]\.content\[0\]"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}], None,
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call("f", {}, "a")]},
      {"role": "tool", "tool_call_id": "zz", "content": "r"}], None, r"messages\[2\]\.tool_call_id 'zz'"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {}}], r"tools\[0\]\.function\.name"),
    ([{"role": "user", "content": "x"}], ["web_search"], r"tools\[0\]: 'web_search' is not a built-in tool"),
])
def test_validation_errors(tok, messages, tools, match):
    for cf in (ChatFormat(tok), ChatFormat(tok, style="hf")):
        with pytest.raises(ValueError, match=match):
            cf.encode_dialog(messages, tools)


PREFILLED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
             {"role": "assistant", "content": "My answer is "}]


def test_continue_final_message(tok):
    # Meta's format encodes each message's text on its own: the prompt is the dialog up to the new
    # assistant header, then the prefilled text, the turn left open.
    meta = ChatFormat(tok, today=MD_DATE)
    ids = meta.encode_dialog(PREFILLED, continue_final_message=True, add_generation_prompt=False)
    assert ids == meta.encode_dialog(PREFILLED[:2]) + tok.encode("My answer is ")
    assert meta.render(PREFILLED, add_generation_prompt=False, continue_final_message=True).endswith(
        H.format("assistant") + "My answer is ")
    # The HF template trims message text, so the continuation starts after "is", as transformers'
    # apply_chat_template(continue_final_message=True) leaves it.
    hf = ChatFormat(tok, style="hf", today=MD_DATE)
    text = hf.render(PREFILLED, add_generation_prompt=False, continue_final_message=True)
    assert text == hf.render(PREFILLED[:2]) + "My answer is"
    assert hf.encode_dialog(PREFILLED, add_generation_prompt=False, continue_final_message=True) == tok.encode(
        text, allow_special=True)
    for cf in (meta, hf):
        with pytest.raises(ValueError, match="exclude each other"):
            cf.encode_dialog(PREFILLED, continue_final_message=True)
        for dialog in (PREFILLED[:2], [*PREFILLED[:2], {"role": "assistant", "content": " "}],
                       [*PREFILLED[:2], {"role": "assistant", "tool_calls": [call("f", {})]}]):
            with pytest.raises(ValueError, match="last message to be an assistant message with text"):
                cf.encode_dialog(dialog, add_generation_prompt=False, continue_final_message=True)


def test_not_a_llama3_tokenizer(smol_gguf):
    with pytest.raises(ValueError, match="no <|begin_of_text|> token"):
        ChatFormat(load_tokenizer(smol_gguf))


# --------------------------------------------------------------------------------------------
# Jinja templates (SmolLM2's ChatML; hostile templates)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smol_gguf):
    return load_tokenizer(smol_gguf)


@pytest.fixture(scope="module")
def smol_ref(smol_gguf):
    """transformers' tokenizer for the GGUF, built as AutoTokenizer.from_pretrained(gguf_file=) does."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, config = get_gguf_tokenizer(str(smol_gguf))
    backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=config["chat_template"],
                                   bos_token=config["bos_token"], eos_token=config["eos_token"])


CHATS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Grüße 🎉 und <|im_end|> im Text"}],
]


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("gen", [True, False])
def test_smollm2_template_matches_transformers(smol, smol_ref, chat, gen):
    cf = chat_format_for(smol)
    assert isinstance(cf, JinjaChatFormat)
    text = cf.render(chat, add_generation_prompt=gen)
    assert text == smol_ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    ids = smol_ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
    assert cf.encode_dialog(chat, add_generation_prompt=gen) == (ids if isinstance(ids, list) else ids["input_ids"])


def test_tool_call_without_text_renders_in_a_template_that_concatenates_content(smol, smol_ref):
    # SmolLM2's template writes `'...' + message['content'] + '...'`: a tool-calling assistant
    # message without text gets "" (as vLLM passes it), not None.
    chat = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Oslo"})]},
            {"role": "tool", "tool_call_id": "c0", "content": "cold"}]
    expected = smol_ref.apply_chat_template([{**m, "content": m["content"] or ""} for m in chat], tokenize=False,
                                            add_generation_prompt=True)
    assert chat_format_for(smol).render(chat) == expected


@pytest.mark.parametrize("final", ["The answer is", "The answer is \n", "Grüße 🎉"])
def test_smollm2_continue_final_message_matches_transformers(smol, smol_ref, final):
    chat = [*CHATS[1], {"role": "assistant", "content": final}]
    cf = chat_format_for(smol)
    text = cf.render(chat, add_generation_prompt=False, continue_final_message=True)
    assert text == smol_ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=False,
                                                continue_final_message=True)
    assert cf.encode_dialog(chat, add_generation_prompt=False, continue_final_message=True) == smol.encode(
        text, allow_special=True)
    with pytest.raises(ChatTemplateError, match="does not write the final message"):
        JinjaChatFormat(smol, "{% for m in messages %}{{ m.role }}{% endfor %}").render(
            chat, add_generation_prompt=False, continue_final_message=True)


TOOL_TEMPLATE = (
    "{% for t in tools %}[{{ t.function.name }}:{{ t | tojson }}]{% endfor %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content if m.content is string else '' }}"
    "{% for c in m.tool_calls or [] %}{{ c.function.name }}({% for k, v in c.function.arguments | items %}"
    "{{ k }}={{ v | tojson }}{% endfor %}){% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}{{ strftime_now('%Y-%m-%d') }}"
)


def test_template_helpers_match_transformers(smol, smol_ref):
    chat = [{"role": "user", "content": "Wetter in Zürich? <b>&'"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "1", "type": "function",
                 "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
            {"role": "tool", "tool_call_id": "1", "content": "<20°C>"}]
    cf = JinjaChatFormat(smol, TOOL_TEMPLATE)
    text = cf.render(chat, [WEATHER])
    assert text == smol_ref.apply_chat_template(chat, tools=[WEATHER], chat_template=TOOL_TEMPLATE, tokenize=False,
                                                add_generation_prompt=True)
    assert '"Zürich"' in text and "<20°C>" in text  # tojson is not HTML-escaped, not ASCII-escaped
    assert JinjaChatFormat(smol, TOOL_TEMPLATE, today=dt.date(2031, 1, 2)).render(chat, []).endswith("2031-01-02")
    with pytest.raises(ChatTemplateError, match="no tools here"):
        JinjaChatFormat(smol, "{{ raise_exception('no tools here') }}").render(chat)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.append(1) }}",
    "{% set x = messages[0].update({'role': 'system'}) %}",
    "{{ (tojson|attr('__globals__')) }}",
])
def test_hostile_templates_cannot_reach_python(smol, template):
    chat = [{"role": "user", "content": "hi"}]
    try:
        out = JinjaChatFormat(smol, template).render(chat)
    except ChatTemplateError:
        return
    # A sandboxed attribute lookup that is not an error renders as undefined: nothing leaks.
    assert not re.search(r"class|module|function|built-in|object at|pwned", out), out
    assert chat == [{"role": "user", "content": "hi"}]


def test_chat_format_for(tok, smol):
    assert isinstance(chat_format_for(tok, style="hf"), ChatFormat)
    assert isinstance(chat_format_for(smol, today=dt.date(2024, 1, 1)), JinjaChatFormat)
    with pytest.raises(ValueError, match="Llama 3.1 format only"):
        chat_format_for(smol, style="hf")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        JinjaChatFormat(smol, "{% for %}")
    bare = load_tokenizer(Path(smol.source))
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_format_for(bare)


KWARGS_TEMPLATE = (
    "{% if greeting is defined %}[{{ greeting }}]{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% if not enable_thinking %}<no-think>{% endif %}{% endif %}"
)


def test_template_kwargs_match_transformers(smol, smol_ref, tmp_path):
    chat = CHATS[1]
    cf = JinjaChatFormat(smol, KWARGS_TEMPLATE, extra_context={"greeting": "from the server"})
    for kwargs in [{}, {"greeting": "Moin", "enable_thinking": True}, {"enable_thinking": False, "unused": [1, 2]}]:
        text = cf.render(chat, chat_template_kwargs=kwargs)
        assert text == smol_ref.apply_chat_template(chat, chat_template=KWARGS_TEMPLATE, tokenize=False,
                                                    add_generation_prompt=True,
                                                    **{"greeting": "from the server", **kwargs})
        assert cf.encode_dialog(chat, chat_template_kwargs=kwargs) == smol.encode(text, allow_special=True)
    with pytest.raises(ValueError, match="may not set \\['add_generation_prompt', 'messages'\\]"):
        cf.render(chat, chat_template_kwargs={"messages": [], "add_generation_prompt": False})
    # A template as vLLM's --chat-template takes it: a file, or its text; for any tokenizer.
    path = tmp_path / "chat.jinja"
    path.write_text(KWARGS_TEMPLATE)
    assert read_chat_template(path) == read_chat_template(str(path)) == read_chat_template(KWARGS_TEMPLATE)
    with pytest.raises(ValueError, match="no such file"):
        read_chat_template(tmp_path / "missing.jinja")
    llama = chat_format_for(llama3_tokenizer(), read_chat_template(path))
    assert isinstance(llama, JinjaChatFormat)
    assert llama.render(chat[:2], chat_template_kwargs={"greeting": "hi"}).startswith("[hi]<system>You are terse.")
