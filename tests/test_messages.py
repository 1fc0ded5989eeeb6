"""POST /v1/messages (Anthropic's Messages API) through Anthropic's own client: text, prefill,
stop sequences, tool use and tool results, streaming, token counting, structured output, errors
in Anthropic's shape, x-api-key, and the model list."""

from __future__ import annotations

import json
from typing import Any, Iterator

import anthropic
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import SCRIPTED, json_values, live, make_scripted, random_params, script, tiny_config

from llama_jax.api import LLM
from llama_jax.server import create_app
from llama_jax.tokenizer import llama3_tokenizer

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tiny() -> LLM:
    config = tiny_config()
    return LLM(config, random_params(config), llama3_tokenizer(), max_slots=2, max_seq_len=512)


@pytest.fixture(scope="module")
def scripted_llm(tiny: LLM) -> LLM:
    return make_scripted(tiny)


@pytest.fixture(scope="module")
def url(scripted_llm: LLM) -> Iterator[str]:
    with live(create_app(scripted_llm, model_name=SCRIPTED, api_keys=["secret"])) as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="secret", max_retries=0, timeout=60)


def chat_ids(llm: LLM, messages: list[dict], tools: list[dict] | None = None, **kw: Any) -> list[int]:
    return llm.chat_format.encode_dialog(messages, tools, **kw)


def test_text_reply_and_usage(client: anthropic.Anthropic, scripted_llm: LLM) -> None:
    with script(scripted_llm, "Sunny, 21 degrees."):
        m = client.messages.create(model=SCRIPTED, max_tokens=50, system="Be brief.", messages=USER)
    assert m.type == "message" and m.role == "assistant" and m.model == SCRIPTED and m.id.startswith("msg_")
    assert [(b.type, b.text) for b in m.content] == [("text", "Sunny, 21 degrees.")]
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    prompt = chat_ids(scripted_llm, [{"role": "system", "content": "Be brief."}, *USER])
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(prompt)
    assert m.usage.output_tokens == len(scripted_llm.tokenizer.encode("Sunny, 21 degrees."))
    counted = client.messages.count_tokens(model=SCRIPTED, system="Be brief.", messages=USER)
    assert counted.input_tokens == len(prompt)


def test_stop_sequences_max_tokens_and_prefill(client: anthropic.Anthropic, scripted_llm: LLM) -> None:
    with script(scripted_llm, "Sunny. STOP and more"):
        stopped = client.messages.create(model=SCRIPTED, max_tokens=50, messages=USER, stop_sequences=["STOP"])
        cut = client.messages.create(model=SCRIPTED, max_tokens=2, messages=USER)
        # A final assistant message is the start of the answer (Anthropic's prefill).
        prefilled = [*USER, {"role": "assistant", "content": "The weather:"}]
        cont = client.messages.create(model=SCRIPTED, max_tokens=50, messages=prefilled)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "STOP"
    assert stopped.content[0].text == "Sunny. "
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2
    ids = chat_ids(scripted_llm, [*USER, {"role": "assistant", "content": "The weather:"}],
                   add_generation_prompt=False, continue_final_message=True)
    assert cont.usage.input_tokens + cont.usage.cache_read_input_tokens == len(ids)


def test_tool_use_round_trip_streamed_and_not(client: anthropic.Anthropic, scripted_llm: LLM) -> None:
    with script(scripted_llm, "Let me check. " + CALL):
        m = client.messages.create(model=SCRIPTED, max_tokens=80, messages=USER, tools=[WEATHER])
        with client.messages.stream(model=SCRIPTED, max_tokens=80, messages=USER, tools=[WEATHER]) as stream:
            kinds = [e.type for e in stream]
            streamed = stream.get_final_message()
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["text", "tool_use"]
    assert m.content[0].text == "Let me check."
    use = m.content[1]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("toolu_")
    assert streamed.stop_reason == "tool_use" and streamed.content[0].text == "Let me check."
    assert (streamed.content[1].name, streamed.content[1].input) == ("get_weather", {"city": "Paris"})
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 2
    # The result goes back as a tool_result block; the prompt is the chat the OpenAI API would run.
    history = [*USER, {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                                        {"type": "tool_use", "id": use.id, "name": use.name,
                                                         "input": use.input}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"},
                                            {"type": "text", "text": "Thanks!"}]}]
    with script(scripted_llm, "It is 21 C."):
        reply = client.messages.create(model=SCRIPTED, max_tokens=50, messages=history, tools=[WEATHER])
    openai_dialog = [*USER, {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": use.id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "21 C"}, {"role": "user", "content": "Thanks!"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": WEATHER["description"],
                                               "parameters": WEATHER["input_schema"]}}]
    expected = chat_ids(scripted_llm, openai_dialog, tools)
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == len(expected)
    assert reply.stop_reason == "end_turn" and reply.content[0].text == "It is 21 C."
    two = CALL + '; {"name": "get_weather", "parameters": {"city": "Rome"}}'
    with script(scripted_llm, two):
        both = client.messages.create(model=SCRIPTED, max_tokens=80, messages=USER, tools=[WEATHER])
        one = {"type": "auto", "disable_parallel_tool_use": True}
        first = client.messages.create(model=SCRIPTED, max_tokens=80, messages=USER, tools=[WEATHER], tool_choice=one)
        with client.messages.stream(model=SCRIPTED, max_tokens=80, messages=USER, tools=[WEATHER],
                                    tool_choice=one) as stream:
            first_streamed = stream.get_final_message()
    assert [b.input["city"] for b in both.content] == ["Paris", "Rome"]
    assert [b.input["city"] for b in first.content] == [b.input["city"] for b in first_streamed.content] == ["Paris"]
    with script(scripted_llm, CALL):
        none = client.messages.create(model=SCRIPTED, max_tokens=80, messages=USER, tools=[WEATHER],
                                      tool_choice={"type": "none"})
    assert none.stop_reason == "end_turn" and none.content[0].text == CALL


def test_streamed_text_equals_whole(client: anthropic.Anthropic, scripted_llm: LLM) -> None:
    with script(scripted_llm, "One, two, three, four."):
        whole = client.messages.create(model=SCRIPTED, max_tokens=50, messages=USER)
        with client.messages.stream(model=SCRIPTED, max_tokens=50, messages=USER) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text == "One, two, three, four."
    assert final.usage.output_tokens == whole.usage.output_tokens and final.stop_reason == "end_turn"


def test_forced_tool_and_json_output(tiny: LLM) -> None:
    """tool_choice "tool" and output_config.format constrain what the (random) model writes.
    (Recent clients no longer send temperature, which older ones did: the server still takes it.)"""
    with live(create_app(tiny, model_name="tiny")) as u:
        client = anthropic.Anthropic(base_url=u, api_key="unused", max_retries=0, timeout=120)
        city = {**WEATHER, "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                                            "required": ["city"], "additionalProperties": False}}  # bounded
        forced = client.messages.create(model="tiny", max_tokens=150, messages=USER, tools=[city],
                                        tool_choice={"type": "tool", "name": "get_weather"},
                                        extra_body={"temperature": 0})
        assert forced.stop_reason == "tool_use" and [b.name for b in forced.content if b.type == "tool_use"] == [
            "get_weather"]
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        shaped = client.messages.create(model="tiny", max_tokens=60, messages=USER, extra_body={
            "temperature": 0, "output_config": {"format": {"type": "json_schema", "schema": schema}}})
        assert set(json.loads(shaped.content[0].text)) == {"ok"}


@pytest.mark.parametrize("body, message", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "of type 'image'"),
    ({"messages": USER, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "custom tools only"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "temperature": 1.5}, "temperature"),
    ({"messages": USER, "bogus": 1}, "bogus"),
    ({"messages": USER, "tool_choice": {"type": "tool"}}, "name goes with"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "tool_use blocks go in assistant messages"),
    ({"messages": [*USER, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]}], "tools": [WEATHER]},
     "send its tool_result first"),
])
def test_bad_requests_get_anthropic_errors(url: str, body: dict, message: str) -> None:
    r = httpx.post(f"{url}/v1/messages", json={"model": SCRIPTED, "max_tokens": 10, **body},
                   headers={"x-api-key": "secret"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert message in err["error"]["message"]


def test_models_list_reads_in_anthropic_client(client: anthropic.Anthropic) -> None:
    (model,) = list(client.models.list())
    assert (model.id, model.display_name, model.type) == (SCRIPTED, SCRIPTED, "model") and model.created_at.year > 2000
    assert client.models.retrieve(SCRIPTED).id == SCRIPTED


def test_keys_models_and_routes(url: str) -> None:
    body = {"model": SCRIPTED, "max_tokens": 5, "messages": USER}
    denied = httpx.post(f"{url}/v1/messages", json=body, headers={"x-api-key": "wrong"}, timeout=30)
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    other = httpx.post(f"{url}/v1/messages", json={**body, "model": "claude-x"}, headers={"x-api-key": "secret"})
    assert other.status_code == 404 and other.json()["error"]["type"] == "not_found_error"
    # OpenAI routes keep OpenAI's error shape, and take the same key as a bearer token.
    openai_404 = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "claude-x"},
                            headers={"authorization": "Bearer secret"})
    assert openai_404.status_code == 404 and "param" in openai_404.json()["error"]


blocks = st.lists(st.sampled_from([
    {"type": "text", "text": "hi"}, {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "x"}},
    {"type": "tool_result", "tool_use_id": "t1", "content": "21 C"}, {"type": "image", "source": {}}]) | json_values,
    max_size=3)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                           "content": st.text(max_size=20) | blocks}), max_size=3)
FIELDS = {"system": st.text(max_size=10) | json_values, "tools": st.lists(st.just(WEATHER), max_size=2) | json_values,
          "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"},
                                          {"type": "tool", "name": "get_weather"}]) | json_values,
          "stop_sequences": st.lists(st.text(max_size=4), max_size=5) | json_values,
          "temperature": st.floats(-1, 2) | json_values, "top_k": st.integers(-1, 5), "stream": st.booleans(),
          "thinking": json_values, "output_config": json_values, "metadata": json_values}


@st.composite
def message_bodies(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {"model": SCRIPTED, "max_tokens": draw(st.integers(-1, 4) | json_values),
                            "messages": draw(messages | json_values)}
    for field in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True)):
        body[field] = draw(FIELDS[field])
    return body


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=message_bodies())
def test_fuzz_messages_schema(url: str, scripted_llm: LLM, body: Any) -> None:
    """Whatever the body, an answer or a 4xx in Anthropic's shape: never a 500, never a dead server."""
    with script(scripted_llm, "ok"):
        r = httpx.post(f"{url}/v1/messages", content=json.dumps(body), timeout=30,
                       headers={"content-type": "application/json", "x-api-key": "secret"})
    assert r.status_code in (200, 400, 404), (r.status_code, r.text)
    if r.status_code != 200:
        err = r.json()
        assert err["type"] == "error" and isinstance(err["error"]["message"], str)
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith('data: {"type": "message_stop"}') or "event: error" in r.text
    else:
        assert r.json()["type"] == "message"
