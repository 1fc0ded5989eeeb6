"""The OpenAI-compatible server, live on 127.0.0.1 and driven by the official `openai` client.

Two servers: a tiny random-weight model with the Llama 3 tokenizer (real engine, greedy, fast),
and the same model behind a scripted engine that "generates" given text, so tool calls, stop
strings and slow requests are exercised end to end deterministically. A hypothesis fuzzer posts
random bodies and checks that every answer is a 200 or an OpenAI-shaped 4xx, never a 500. One
slow test serves the demo model (SmolLM2-135M-Instruct) when its GGUF is on the machine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.metadata
import json
import re
import socket
import threading
import time
from typing import Any, Iterator, Literal

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_jax.api import LLM
from llama_jax.chat_format import ChatTemplateError
from llama_jax.config import LlamaConfig
from llama_jax.engine import PrefillJob, StepOutput
from llama_jax.model import param_shapes
from llama_jax.sampling import MAX_TOP_LOGPROBS
from llama_jax.scheduler import Scheduler
from llama_jax.tokenizer import llama3_tokenizer

uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from llama_jax.server import create_app  # noqa: E402
from llama_jax.server.errors import APIError  # noqa: E402
from llama_jax.server.chat import NAMED_INSTRUCTION, REQUIRED_INSTRUCTION, dialog  # noqa: E402
from llama_jax.server.protocol import ChatCompletionRequest  # noqa: E402

MODEL = "tiny-llama3"
SCRIPTED = "scripted"
USER = [{"role": "user", "content": "Say something."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}


# ---- fixtures ----


def tiny_config() -> LlamaConfig:
    return LlamaConfig.from_preset("tiny").replace(
        vocab_size=128_256, bos_token_id=128_000, eos_token_ids=(128_001, 128_008, 128_009))


def random_params(config: LlamaConfig, seed: int = 0) -> dict[str, Any]:
    """Random float32 weights scaled like `Llama`'s init (numpy: 20x faster than NNX's eager init
    for a 128k vocabulary)."""
    rng = np.random.default_rng(seed)
    fan_in = {"embed": 1, "wo": config.n_heads * config.head_dim, "w_down": config.ffn_dim}

    def make(name: str, shape: tuple[int, ...]) -> jnp.ndarray:
        if name.endswith("norm"):
            return jnp.asarray(1 + 0.1 * rng.standard_normal(shape, dtype=np.float32))
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * fan_in.get(name, config.dim) ** -0.5)

    shapes = param_shapes(config)
    params = {k: make(k, v) for k, v in shapes.items() if k != "layers"}
    params["layers"] = {k: make(k, v) for k, v in shapes["layers"].items()}
    return params


@pytest.fixture(scope="module")
def tiny_llm() -> LLM:
    config = tiny_config()
    return LLM(config, random_params(config), llama3_tokenizer(), max_slots=16, max_seq_len=256)


class ScriptedEngine:
    """Stands in for `Engine`: every request "generates" `script` (token ids), then <|eot_id|>.
    `delay` seconds per decode dispatch simulate a slow model."""

    def __init__(self, config: LlamaConfig, max_slots: int, max_seq_len: int, decode_steps: int, eot: int):
        self.config = config
        self.prefill_buckets = (max_seq_len,)
        self.filling: dict[int, int] = {}  # never used: every prompt fits one call
        self.max_slots, self.max_seq_len, self.decode_steps, self.eot = max_slots, max_seq_len, decode_steps, eot
        self.adapters = 0  # no LoRA adapters
        self.speculation = None  # no speculative decoding
        self.script: list[int] = []
        self.delay = 0.0
        self.fail_next = False
        self._left: dict[int, list[int]] = {}

    def free_slots(self) -> list[int]:
        return [i for i in range(self.max_slots) if i not in self._left]

    def _output(self, tokens: np.ndarray, logprobs: bool) -> StepOutput:
        if not logprobs:
            return StepOutput(tokens)
        top_ids = np.repeat(tokens[..., None], MAX_TOP_LOGPROBS, axis=-1)
        return StepOutput(tokens, np.full(tokens.shape, -0.5), np.full(top_ids.shape, -0.5), top_ids)

    def prefill_next(self, jobs: list[PrefillJob]) -> list[StepOutput]:
        seq = [*self.script, self.eot]
        for job in jobs:
            self._left[job.slot] = seq[1:]
        return [self._output(np.full((1, 1), seq[0]), job.sampling.logprobs) for job in jobs]

    def decode(self, want_logprobs: bool = False, steps: int | None = None) -> StepOutput:
        time.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device on fire")
        steps = steps or self.decode_steps
        tokens = np.full((steps, self.max_slots), self.eot)
        for slot, left in self._left.items():
            take, left[:] = left[:steps], left[steps:]
            tokens[: len(take), slot] = take
        return self._output(tokens, want_logprobs)

    def constrain(self, slots: list[int], masks: np.ndarray) -> None:
        pass  # the script is what it is: a constrained request ends where it leaves the grammar

    def release(self, slot: int) -> None:
        self._left.pop(slot, None)

    def reset(self) -> None:
        self._left.clear()


def make_scripted(tiny_llm: LLM, **kw: Any) -> LLM:
    tok = tiny_llm.tokenizer
    llm = LLM(tiny_llm.config, tiny_llm.params, tok, max_slots=4, max_seq_len=64, **kw)
    llm.engine = ScriptedEngine(tiny_llm.config, max_slots=4, max_seq_len=2048, decode_steps=4,
                                eot=tok.special_tokens["<|eot_id|>"])
    llm.scheduler = Scheduler(llm.engine, tok, prefix_reuse=False)  # the script has no cache to reuse
    return llm


@pytest.fixture(scope="module")
def scripted_llm(tiny_llm: LLM) -> LLM:
    return make_scripted(tiny_llm)


@contextlib.contextmanager
def live(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port of 127.0.0.1 in a background thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def url(tiny_llm: LLM) -> Iterator[str]:
    with live(create_app(tiny_llm, model_name=MODEL, max_queue=64)) as u:
        yield u


@pytest.fixture(scope="module")
def scripted_url(scripted_llm: LLM) -> Iterator[str]:
    with live(create_app(scripted_llm, model_name=SCRIPTED)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def scripted(scripted_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{scripted_url}/v1", api_key="unused", max_retries=0, timeout=60)


@contextlib.contextmanager
def script(llm: LLM, text: str, delay: float = 0.0) -> Iterator[None]:
    engine = llm.engine
    engine.script, engine.delay = llm.tokenizer.encode(text, allow_special=True), delay
    try:
        yield
    finally:
        engine.script, engine.delay = [], 0.0


def accumulate(stream: Any) -> dict[str, Any]:
    """The client-side loop of the OpenAI guides: content and tool calls (by index) from deltas."""
    content, calls, finish, usage, first_role = "", {}, None, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            first_role = first_role or delta.role
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                if tc.function is not None:
                    entry["name"] += tc.function.name or ""
                    entry["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return {"content": content, "calls": [calls[i] for i in sorted(calls)], "finish": finish, "usage": usage,
            "role": first_role}


def assert_error(r: httpx.Response, status: int, param: str | None = "any") -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


# ---- chat on the tiny model ----


def test_models_and_health(client: openai.OpenAI, url: str) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/version").json() == {"version": importlib.metadata.version("llama-jax")}


def test_health_reports_a_stalled_step_and_failed_checks(tiny_llm: LLM) -> None:
    """A step running past stall_timeout (a hung device or collective) makes /health a 503, as
    does a failing extra check (a lockstep process gone), so a supervisor restarts the server."""
    llm = make_scripted(tiny_llm)
    problems: list[str] = []
    app = create_app(llm, model_name=SCRIPTED, stall_timeout=0.3, health_checks=[lambda: next(iter(problems), None)])
    with live(app) as u, script(llm, "Slow.", delay=1.0):
        assert httpx.get(f"{u}/health").status_code == 200
        client = openai.OpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=0, timeout=60)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reply = pool.submit(client.chat.completions.create, model=SCRIPTED, messages=USER)
            deadline = time.monotonic() + 10
            while (r := httpx.get(f"{u}/health")).status_code == 200:
                assert time.monotonic() < deadline, "a step of 1 s never showed as stalled"
                time.sleep(0.05)
            err = assert_error(r, 503, None)
            assert err["code"] == "engine_stalled" and "over 0.3 s" in err["message"]
            assert reply.result().choices[0].message.content == "Slow."
        assert httpx.get(f"{u}/health").status_code == 200  # between steps
        problems.append("process 1 has gone away; restart the job")
        err = assert_error(httpx.get(f"{u}/health"), 503, None)
        assert err["message"] == problems[0] and err["code"] == "engine_down"
    with pytest.raises(ValueError, match="stall_timeout"):
        create_app(llm, stall_timeout=0)


def test_chat_stream_equals_non_stream(client: openai.OpenAI, tiny_llm: LLM) -> None:
    kw = dict(model=MODEL, messages=USER, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion" and full.model == MODEL
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    prompt_ids = tiny_llm.chat_format.encode_dialog(USER, None)
    assert full.usage.prompt_tokens == len(prompt_ids)
    assert full.usage.completion_tokens == len(choice.logprobs.content) > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)

    streamed = accumulate(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert streamed["role"] == "assistant"
    assert streamed["content"] == choice.message.content and streamed["finish"] == choice.finish_reason
    details = {"prompt_tokens_details"}
    assert streamed["usage"].model_dump(exclude=details) == full.usage.model_dump(exclude=details)
    # The same prompt again: its slot's cache holds it, all but the last token (whose logits start the answer).
    assert streamed["usage"].prompt_tokens_details.cached_tokens == len(prompt_ids) - 1


def test_sse_framing(url: str) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_continuous_usage_stats(scripted_url: str, scripted_llm: LLM) -> None:
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body in [("/v1/chat/completions", {"messages": USER, "n": 2}), ("/v1/completions", {"prompt": "Hi"})]:
        with script(scripted_llm, "one two three four five"):
            r = httpx.post(f"{scripted_url}{path}", json={"model": SCRIPTED, "stream": True, "stream_options": options,
                                                          **body}, timeout=60)
        chunks = [json.loads(e.removeprefix("data: ")) for e in r.text.split("\n\n")[:-2]]
        usages = [c["usage"] for c in chunks]
        assert all(u is not None for u in usages) and len({u["prompt_tokens"] for u in usages}) == 1
        made = [u["completion_tokens"] for u in usages]
        assert made == sorted(made) and made[-1] == made[-2] > made[0]  # the last chunk repeats the total
        assert chunks[-1]["choices"] == [] and made[-1] == body.get("n", 1) * len(scripted_llm.tokenizer.encode(
            "one two three four five"))


def test_concurrent_streams_equal_solo_runs(client: openai.OpenAI, url: str) -> None:
    """16 concurrent greedy streams all complete, each identical to the same request alone."""
    prompts = [[{"role": "user", "content": f"Count to {i}, please."}] for i in range(16)]

    def run(messages: list[dict]) -> str:
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                stream=True)
        return accumulate(stream)["content"]

    solo = [run(m) for m in prompts]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, prompts))
    assert together == solo
    assert len(set(solo)) > 1  # the prompts differ, so should the outputs
    metrics = httpx.get(f"{url}/metrics").text
    assert 'llama_jax_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics


# ---- /v1/completions ----


# ~40 tokens, like the chat prompts above: one prefill bucket, so fewer compilations.
TEXT = "The quick brown fox jumps over the lazy dog. " * 4
OTHER = "A journey of a thousand miles begins with a single step. " * 3


def test_completions(client: openai.OpenAI, tiny_llm: LLM) -> None:
    tok = tiny_llm.tokenizer
    text = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=6, temperature=0)
    assert text.id.startswith("cmpl-") and text.object == "text_completion"
    assert text.usage.prompt_tokens == len(tok.encode(TEXT)) + 1  # BOS added once
    # Special tokens in the prompt are honoured; an explicit BOS is not doubled.
    special = client.completions.create(model=MODEL, prompt="<|begin_of_text|>" + TEXT, max_tokens=6,
                                        temperature=0)
    assert special.usage.prompt_tokens == text.usage.prompt_tokens
    assert special.choices[0].text == text.choices[0].text
    by_ids = client.completions.create(model=MODEL, prompt=[tok.bos_id, *tok.encode(TEXT)], max_tokens=6,
                                       temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text

    many = client.completions.create(model=MODEL, prompt=[TEXT, OTHER], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == text.choices[0].text
    assert many.choices[2].text != text.choices[0].text
    assert many.usage.completion_tokens == 24

    streamed = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6


def test_completions_echo_and_logprobs(client: openai.OpenAI, tiny_llm: LLM) -> None:
    r = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=5, temperature=0, echo=True, logprobs=2,
                                  extra_body={"prompt_logprobs": 3})
    choice = r.choices[0]
    lp = choice.logprobs
    n_prompt = r.usage.prompt_tokens
    assert choice.text.startswith(TEXT)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens[:n_prompt]) == "<|begin_of_text|>" + TEXT
    assert lp.text_offset == sorted(lp.text_offset)
    # The echoed prompt's log-probabilities come from a full forward pass: check one against it.
    ids = [tiny_llm.tokenizer.bos_id, *tiny_llm.tokenizer.encode(TEXT)]
    logits = tiny_llm.logits([ids])[0, 0].astype(np.float64)
    expected = logits[ids[1]] - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert lp.token_logprobs[1] == pytest.approx(expected, abs=1e-4)
    for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]):
        assert token in top and 2 <= len(top) <= 3
    # vLLM's prompt_logprobs: the prompt token and the 3 most likely, with ranks and text.
    plp = choice.model_extra["prompt_logprobs"]
    assert len(plp) == n_prompt and plp[0] is None
    first = plp[1][str(ids[1])]
    assert first["logprob"] == pytest.approx(expected, abs=1e-4) and first["decoded_token"] == lp.tokens[1]
    assert first["rank"] == 1 + int(np.sum(logits > logits[ids[1]]))
    for i in range(1, n_prompt):
        entries = plp[i]
        assert entries[str(ids[i])]["logprob"] == pytest.approx(lp.token_logprobs[i], abs=1e-5)
        top = sorted((e["rank"], e["logprob"]) for t, e in entries.items() if e["rank"] <= 3)
        assert [rank for rank, _ in top] == [1, 2, 3] and top == sorted(top, key=lambda e: -e[1])
        assert 3 <= len(entries) <= 4


# ---- sampling: last on the tiny model, one token per choice ----
# (A sampled decode step with top-p or top-k sorts the 128k-entry vocabulary of all 16 slots: about
# 1.7 s on this CPU. With max_tokens=1 only the prefill samples, for one row.)


def test_chat_prompt_logprobs(client: openai.OpenAI, url: str) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1, temperature=0,
                                           extra_body={"prompt_logprobs": 0})
    plp = reply.model_extra["prompt_logprobs"]
    ids = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": USER}).json()["tokens"]
    assert len(plp) == len(ids) == reply.usage.prompt_tokens and plp[0] is None
    assert [list(e) for e in plp[1:]] == [[str(t)] for t in ids[1:]]  # only the prompt's own tokens
    same = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1,
                                                    "prompt_logprobs": 0}).json()["choices"][0]["prompt_logprobs"]
    for a, b in zip(same[1:], plp[1:]):
        (t, x), (u, y) = *a.items(), *b.items()
        assert t == u and x["rank"] == y["rank"] and x["logprob"] == pytest.approx(y["logprob"], abs=1e-6)
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": USER, "stream": True,
                                                      "prompt_logprobs": 1})
    assert "not available with stream" in assert_error(r, 400, "prompt_logprobs")["message"]


def test_continue_final_message(client: openai.OpenAI, url: str, tiny_llm: LLM) -> None:
    messages = [{"role": "user", "content": "Count with me."}, {"role": "assistant", "content": "One, two,"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                           extra_body={"continue_final_message": True})
    ids = tiny_llm.chat_format.encode_dialog(messages, add_generation_prompt=False, continue_final_message=True)
    same = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == same.choices[0].text
    assert reply.usage.prompt_tokens == len(ids) == same.usage.prompt_tokens
    counted = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": messages, "continue_final_message": True})
    assert counted.json()["tokens"] == ids
    for body, message in [({"messages": messages, "continue_final_message": True, "add_generation_prompt": True},
                           "exclude each other"),
                          ({"messages": messages[:1], "continue_final_message": True}, "assistant message with text")]:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, **body})
        assert message in assert_error(r, 400)["message"]


def test_n_and_seeds(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=USER, max_tokens=1, temperature=1.0, seed=1234)
    three = client.chat.completions.create(**kw, n=3)
    again = client.chat.completions.create(**kw, n=3)
    one = client.chat.completions.create(**kw)
    texts = [c.message.content for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert texts[0] == one.choices[0].message.content  # choice i uses seed + i
    assert len(set(texts)) > 1
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3

    streamed = client.chat.completions.create(**kw, n=3, stream=True)
    per_choice = [""] * 3
    for chunk in streamed:
        for c in chunk.choices:
            per_choice[c.index] += c.delta.content or ""
    assert per_choice == texts


def test_sampling_fields_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_completion_tokens=1, temperature=0.7, top_p=0.5, presence_penalty=0.5,
        frequency_penalty=0.5, stop=["zzz", "qqq"], user="u", metadata={"k": "v"}, store=False,
        response_format={"type": "text"},
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 1, "stop_token_ids": [128001]})
    assert r.usage.completion_tokens == 1


def test_logit_bias(client: openai.OpenAI, url: str, tiny_llm: LLM) -> None:
    tok = tiny_llm.tokenizer
    banana = tok.encode(" banana")
    assert len(banana) == 1
    kw = dict(model=MODEL, prompt=TEXT, max_tokens=3, temperature=0)
    forced = client.completions.create(**kw, logit_bias={str(banana[0]): 100})
    assert forced.choices[0].text == " banana" * 3
    # Pushing the greedy first token down makes the model pick its second choice.
    plain = client.completions.create(**kw, logprobs=2)
    first, second = plain.choices[0].logprobs.top_logprobs[0]
    avoided = client.completions.create(**kw, logit_bias={str(tok.encode(first)[0]): -100}, logprobs=2)
    assert avoided.choices[0].logprobs.tokens[0] == second
    # Log-probabilities stay the model's, not the biased distribution's.
    assert avoided.choices[0].logprobs.top_logprobs[0] == plain.choices[0].logprobs.top_logprobs[0]
    r = httpx.post(f"{url}/v1/chat/completions", json=_chat(logit_bias={str(tiny_llm.config.vocab_size): 1}))
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


# ---- scripted output: tool calls, stop strings ----


CALL_TEXT = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'
TWO_CALLS = ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
             '{"name": "get_time", "parameters": {"tz": "CET"}}')


def test_tool_call_stream_equals_non_stream(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    kw = dict(model=SCRIPTED, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME])
    with script(scripted_llm, CALL_TEXT):
        full = scripted.chat.completions.create(**kw)
        streamed = accumulate(scripted.chat.completions.create(**kw, stream=True,
                                                               stream_options={"include_usage": True}))
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert streamed["finish"] == "tool_calls" and streamed["content"] == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"]] == [("get_weather", {"city": "Paris"})]
    assert streamed["calls"][0]["id"]
    n_script = len(scripted_llm.tokenizer.encode(CALL_TEXT, allow_special=True))
    assert full.usage.completion_tokens == streamed["usage"].completion_tokens == n_script


def test_parallel_tool_calls(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    kw = dict(model=SCRIPTED, messages=USER, tools=[WEATHER, TIME])
    with script(scripted_llm, "Checking. " + TWO_CALLS):
        both = scripted.chat.completions.create(**kw)
        first = scripted.chat.completions.create(**kw, parallel_tool_calls=False)
        streamed = accumulate(scripted.chat.completions.create(**kw, stream=True))
        streamed_first = accumulate(scripted.chat.completions.create(**kw, stream=True, parallel_tool_calls=False))
    names = [c.function.name for c in both.choices[0].message.tool_calls]
    assert names == ["get_weather", "get_time"] and both.choices[0].message.content == "Checking."
    assert [c["name"] for c in streamed["calls"]] == names and streamed["content"] == "Checking."
    assert [c.function.name for c in first.choices[0].message.tool_calls] == ["get_weather"]
    assert [c["name"] for c in streamed_first["calls"]] == ["get_weather"]
    assert len({c.id for c in both.choices[0].message.tool_calls}) == 2


def test_tool_choice_none_leaves_text(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    with script(scripted_llm, CALL_TEXT):
        r = scripted.chat.completions.create(model=SCRIPTED, messages=USER, tools=[WEATHER], tool_choice="none")
        raw = scripted.chat.completions.create(model=SCRIPTED, messages=USER, tools=[WEATHER], tool_choice="none",
                                               extra_body={"skip_special_tokens": False})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == CALL_TEXT.removeprefix("<|python_tag|>")
    assert raw.choices[0].message.content == CALL_TEXT


def test_tool_choice_rendering() -> None:
    def body(**kw: Any) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "tools": [WEATHER, TIME], **kw})

    messages, tools = dialog(body(tool_choice="none"))
    assert tools is None and messages == USER
    messages, tools = dialog(body())
    assert [t["function"]["name"] for t in tools] == ["get_weather", "get_time"] and messages == USER
    messages, tools = dialog(body(tool_choice="required"))
    assert len(tools) == 2 and messages[0] == {"role": "system", "content": REQUIRED_INSTRUCTION}
    named = {"type": "function", "function": {"name": "get_time"}}
    messages, tools = dialog(body(tool_choice=named, messages=[{"role": "system", "content": "Be brief."}, *USER]))
    assert [t["function"]["name"] for t in tools] == ["get_time"]
    assert messages[0]["content"] == "Be brief.\n\n" + NAMED_INSTRUCTION.format(name="get_time")


def test_named_tool_choice_end_to_end(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    with script(scripted_llm, '{"name": "get_time", "parameters": {"tz": "UTC"}}'):
        r = scripted.chat.completions.create(model=SCRIPTED, messages=USER, tools=[WEATHER, TIME],
                                             tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert r.choices[0].message.tool_calls[0].function.name == "get_time"
    # Only the named tool is parsed: a call to another tool stays text.
    with script(scripted_llm, CALL_TEXT):
        r = scripted.chat.completions.create(model=SCRIPTED, messages=USER, tools=[WEATHER, TIME],
                                             tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"


def test_multi_turn_with_tool_results(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    with script(scripted_llm, "It is 21 degrees in Paris."):
        r = scripted.chat.completions.create(model=SCRIPTED, messages=messages, tools=[WEATHER])
    assert r.choices[0].message.content == "It is 21 degrees in Paris." and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(scripted_llm.chat_format.encode_dialog(messages, [WEATHER]))


def test_stop_strings(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    with script(scripted_llm, "Hello world. STOP and more text"):
        r = scripted.chat.completions.create(model=SCRIPTED, messages=USER, stop="STOP")
        s = accumulate(scripted.chat.completions.create(model=SCRIPTED, messages=USER, stop=["STOP"], stream=True))
        c = scripted.completions.create(model=SCRIPTED, prompt="x", stop=["and"])
        many = scripted.completions.create(model=SCRIPTED, prompt="x", stop=["q1", "q2", "q3", "q4", "q5", "STOP"])
        too_many = httpx.post(f"{scripted.base_url}completions", timeout=30,
                              json={"model": SCRIPTED, "prompt": "x", "stop": [f"s{i}" for i in range(65)]})
    assert r.choices[0].message.content == "Hello world. " and r.choices[0].finish_reason == "stop"
    assert many.choices[0].text == "Hello world. " and many.choices[0].stop_reason == "STOP"  # vLLM: any number
    assert too_many.status_code == 400 and "at most 64 stop sequences" in too_many.text
    assert s["content"] == "Hello world. " and s["finish"] == "stop"
    assert c.choices[0].text == "Hello world. STOP " and c.choices[0].finish_reason == "stop"
    # vLLM's stop_reason: the stop string, or the stop_token_ids entry, that ended the choice.
    assert r.choices[0].stop_reason == "STOP" and c.choices[0].stop_reason == "and"
    world = scripted_llm.tokenizer.encode(" world")[0]
    with script(scripted_llm, "Hello world. STOP and more text"):
        by_id = scripted.completions.create(model=SCRIPTED, prompt="x", extra_body={"stop_token_ids": [world]})
        body = {"model": SCRIPTED, "messages": USER, "stop": ["more"], "stream": True}
        with httpx.stream("POST", f"{scripted.base_url}chat/completions", json=body, timeout=30) as stream:
            chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    with script(scripted_llm, "Hi."):
        plain = scripted.chat.completions.create(model=SCRIPTED, messages=USER)
    assert by_id.choices[0].text == "Hello" and by_id.choices[0].stop_reason == world
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["stop_reason"] == "more"
    assert plain.choices[0].stop_reason is None  # the model's own end of turn
    # vLLM's include_stop_str_in_output: the stop string found first stays (of two at one place,
    # the first listed), streamed or not.
    keep = {"include_stop_str_in_output": True}
    with script(scripted_llm, "Hello world. STOP and more text"):
        r = scripted.chat.completions.create(model=SCRIPTED, messages=USER, stop=["and", "ST", "STOP"],
                                             extra_body=keep)
        s = accumulate(scripted.chat.completions.create(model=SCRIPTED, messages=USER, stop=["STOP", "ST"],
                                                        stream=True, extra_body=keep))
    assert r.choices[0].message.content == "Hello world. ST" and s["content"] == "Hello world. STOP"


def test_skip_special_tokens(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    """vLLM's skip_special_tokens (default true): special tokens' text is left out of the output
    text, not out of the token ids; with tools to parse, the parser still sees <|python_tag|>."""
    text = "A<|reserved_special_token_7|>B <|python_tag|>C"
    ids = scripted_llm.tokenizer.encode(text, allow_special=True)
    with script(scripted_llm, text):
        default = scripted.completions.create(model=SCRIPTED, prompt="x", extra_body={"return_token_ids": True})
        kept = scripted.completions.create(model=SCRIPTED, prompt="x", extra_body={"skip_special_tokens": False,
                                                                                 "spaces_between_special_tokens": True})
        streamed = "".join(c.choices[0].text for c in scripted.completions.create(model=SCRIPTED, prompt="x",
                                                                                stream=True) if c.choices)
        chat = scripted.chat.completions.create(model=SCRIPTED, messages=USER)
    assert default.choices[0].text == streamed == chat.choices[0].message.content == "AB C"
    assert default.choices[0].model_extra["token_ids"] == ids and kept.choices[0].text == text
    with script(scripted_llm, CALL_TEXT):
        call = scripted.chat.completions.create(model=SCRIPTED, messages=USER, tools=[WEATHER])
        in_python = scripted_llm.chat(USER, tools=["brave_search", WEATHER])
        streamed_calls = [c["function"]["name"] for d in scripted_llm.chat_stream(USER, tools=[WEATHER])
                          for c in d.get("tool_calls", []) if "name" in c["function"]]
        plain = scripted_llm.generate("x")
    assert call.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert call.choices[0].message.content is None
    assert [c["function"]["name"] for c in in_python.tool_calls] == streamed_calls == ["get_weather"]
    assert plain.text == CALL_TEXT.removeprefix("<|python_tag|>")


def test_truncate_prompt_tokens(scripted_url: str, scripted_llm: LLM) -> None:
    """vLLM's truncate_prompt_tokens: only the prompt's last k tokens are kept (-1: the context's worth)."""
    tok = scripted_llm.tokenizer

    def post(path: str, **body: Any) -> httpx.Response:
        with script(scripted_llm, "ok"):
            return httpx.post(f"{scripted_url}{path}", json={"model": SCRIPTED, "return_token_ids": True, **body},
                              timeout=60)

    prompt = "one two three four five six seven"
    ids = scripted_llm.encode_prompt(prompt)
    for sent in (prompt, ids):
        done = post("/v1/completions", prompt=sent, truncate_prompt_tokens=3, echo=True, max_tokens=1).json()
        assert done["choices"][0]["prompt_token_ids"] == ids[-3:] and done["usage"]["prompt_tokens"] == 3
        assert done["choices"][0]["text"] == tok.decode(ids[-3:]) + "ok"
    dialog = scripted_llm.chat_format.encode_dialog(USER)
    chat = post("/v1/chat/completions", messages=USER, truncate_prompt_tokens=5).json()
    assert chat["prompt_token_ids"] == dialog[-5:] and chat["usage"]["prompt_tokens"] == 5
    assert post("/v1/completions", prompt=ids, truncate_prompt_tokens=len(ids) + 5).json()["usage"]["prompt_tokens"] \
        == len(ids)
    # -1 keeps a context's worth, which leaves no room for output here: the usual 400.
    long = post("/v1/completions", prompt=ids * (scripted_llm.max_seq_len // len(ids) + 1), truncate_prompt_tokens=-1)
    assert long.status_code == 400 and "context holds" in long.json()["error"]["message"]
    for bad in (0, scripted_llm.max_seq_len + 1, -2, "3"):
        r = post("/v1/completions", prompt=prompt, truncate_prompt_tokens=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", r.text


def test_request_priority(scripted_url: str, scripted_llm: LLM) -> None:
    """vLLM's `priority`: a 400 unless the server schedules by priority (--scheduling-policy)."""
    body = {"model": SCRIPTED, "prompt": "x", "max_tokens": 2, "priority": -3}
    r = httpx.post(f"{scripted_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
    scripted_llm.scheduler.policy = "priority"
    try:
        with script(scripted_llm, "ok"):
            r = httpx.post(f"{scripted_url}/v1/completions", json=body, timeout=30)
            chat = httpx.post(f"{scripted_url}/v1/chat/completions", timeout=30,
                              json={"model": SCRIPTED, "messages": USER, "priority": 2})
    finally:
        scripted_llm.scheduler.policy = "fcfs"
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == "ok"


def test_return_token_ids(scripted_url: str, scripted_llm: LLM) -> None:
    """vLLM's return_token_ids: the prompt's and each choice's token ids, whole or streamed."""
    tok = scripted_llm.tokenizer
    said = tok.encode("Hello world.")

    def post(path: str, **body: Any) -> httpx.Response:
        with script(scripted_llm, "Hello world."):
            return httpx.post(f"{scripted_url}{path}", json={"model": SCRIPTED, "return_token_ids": True, **body},
                              timeout=60)

    chat = post("/v1/chat/completions", messages=USER, n=2).json()
    assert chat["prompt_token_ids"] == scripted_llm.chat_format.encode_dialog(USER)
    assert [c["token_ids"] for c in chat["choices"]] == [said, said]
    done = post("/v1/completions", prompt=["Hi", "Bye"]).json()
    assert [c["prompt_token_ids"] for c in done["choices"]] == [scripted_llm.encode_prompt(p) for p in ("Hi", "Bye")]
    assert all(c["token_ids"] == said for c in done["choices"])
    for path, body in [("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "Hi"})]:
        chunks = [json.loads(e.removeprefix("data: ")) for e in post(path, stream=True, **body).text.split("\n\n")[:-2]]
        streamed = [t for c in chunks for choice in c["choices"] for t in choice.get("token_ids") or []]
        prompts = [c.get("prompt_token_ids") or c["choices"][0].get("prompt_token_ids") for c in chunks if c["choices"]]
        assert streamed == said and prompts[0] and not any(prompts[1:])
    plain = httpx.post(f"{scripted_url}/v1/completions", json={"model": SCRIPTED, "prompt": "Hi", "max_tokens": 2})
    assert "token_ids" not in plain.json()["choices"][0] and "prompt_token_ids" not in plain.json()["choices"][0]


def test_text_held_back_for_a_stop_string_is_output_when_the_turn_ends(scripted: openai.OpenAI,
                                                                      scripted_llm: LLM) -> None:
    with script(scripted_llm, "Hello ST"):
        r = scripted.chat.completions.create(model=SCRIPTED, messages=USER, stop="STOP")
        s = accumulate(scripted.chat.completions.create(model=SCRIPTED, messages=USER, stop="STOP", stream=True))
    assert r.choices[0].message.content == s["content"] == "Hello ST"


def test_usage_reports_the_prompt_tokens_a_follow_up_found_cached(client: openai.OpenAI, url: str) -> None:
    system = {"role": "system", "content": "You answer in one short sentence, plainly, without lists. " * 3}
    messages = [system, {"role": "user", "content": "Tell me about rivers."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And lakes?"}]
    second = accumulate(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))
    # At least the first turn's prompt (the answer's text may encode to other tokens than were sampled).
    cached = second["usage"].prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 1
    metric = re.search(r"^llama_jax_cached_prompt_tokens_total ([0-9.e+]+)$", httpx.get(f"{url}/metrics").text, re.M)
    assert metric and float(metric[1]) >= cached


# ---- structured output (the tiny random model: whatever it picks, the output must match) ----

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 5}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "pet": {"enum": ["cat", "dog"]}},
    "required": ["name", "age", "pet"], "additionalProperties": False,
}


def assert_person(content: str) -> None:
    person = json.loads(content)
    assert list(person) == ["name", "age", "pet"] and len(person["name"]) <= 5
    assert type(person["age"]) is int and 0 <= person["age"] <= 99 and person["pet"] in ("cat", "dog")


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    kw = dict(model=MODEL, messages=USER, response_format=fmt, max_tokens=200, temperature=1.0, seed=4)
    full = client.chat.completions.create(**kw)
    streamed = accumulate(client.chat.completions.create(**kw, stream=True))
    assert_person(full.choices[0].message.content)
    assert full.choices[0].finish_reason == "stop"
    assert streamed["content"] == full.choices[0].message.content and streamed["finish"] == "stop"
    several = client.chat.completions.create(**{**kw, "n": 3, "temperature": 1.0})
    for choice in several.choices:
        assert_person(choice.message.content)


def test_parse_into_a_pydantic_model(client: openai.OpenAI) -> None:
    """The openai client's `parse`: it sends the model's strict JSON schema and validates the answer."""
    import pydantic

    class Pet(pydantic.BaseModel):
        kind: Literal["cat", "dog", "fish"]
        legs: int = pydantic.Field(ge=0, le=8)
        vaccinated: bool

    r = client.chat.completions.parse(model=MODEL, messages=USER, response_format=Pet, max_tokens=100,
                                      temperature=1.0, seed=1)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8


def test_json_mode_and_vllm_structured_outputs(client: openai.OpenAI) -> None:
    obj = client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"},
                                         max_tokens=8, temperature=0)
    assert obj.choices[0].message.content.lstrip().startswith("{")
    choice = client.completions.create(model=MODEL, prompt="Yes or no?", max_tokens=10, temperature=1.0, seed=2,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].text in ("yes", "no") and choice.choices[0].finish_reason == "stop"
    regex = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, temperature=1.0, seed=3,
                                           extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", regex.choices[0].message.content)
    grammar = client.completions.create(model=MODEL, prompt="x", max_tokens=30, temperature=1.0, seed=5,
                                        extra_body={"structured_outputs": {"grammar": 'start: "<" [/[ab]/+] ">"'}})
    assert re.fullmatch("<[ab]*>", grammar.choices[0].text)


@pytest.fixture(scope="module")
def long_client(tiny_llm: LLM) -> Iterator[openai.OpenAI]:
    """The tiny model with room for the Llama 3.1 tool prompt."""
    llm = LLM(tiny_llm.config, tiny_llm.params, tiny_llm.tokenizer, max_slots=2, max_seq_len=512)
    with live(create_app(llm, model_name=MODEL)) as u:
        yield openai.OpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=0, timeout=120)


def test_tool_choice_required_and_named_force_valid_calls(long_client: openai.OpenAI) -> None:
    client = long_client
    weather = {**WEATHER, "function": {**WEATHER["function"], "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
    clock = {**TIME, "function": {**TIME["function"], "parameters": {
        "type": "object", "properties": {"tz": {"type": "string", "maxLength": 4}}, "required": ["tz"],
        "additionalProperties": False}}}
    kw = dict(model=MODEL, messages=USER, tools=[weather, clock], max_tokens=150, temperature=1.0)
    for seed in range(2):
        r = client.chat.completions.create(**kw, tool_choice="required", seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            args = json.loads(call.function.arguments)
            assert (call.function.name, list(args)) in (("get_weather", ["city"]), ("get_time", ["tz"]))
    named = {"type": "function", "function": {"name": "get_weather"}}
    streamed = accumulate(client.chat.completions.create(**kw, tool_choice=named, seed=7, stream=True))
    (call,) = streamed["calls"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"] in ("Paris", "Rome")
    single = client.chat.completions.create(**kw, tool_choice="required", parallel_tool_calls=False, seed=3)
    assert len(single.choices[0].message.tool_calls) == 1


def test_completions_default_max_tokens(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    with script(scripted_llm, " word" * 40):
        legacy = scripted.completions.create(model=SCRIPTED, prompt="x")
        chat = scripted.chat.completions.create(model=SCRIPTED, messages=USER)
    assert legacy.usage.completion_tokens == 16 and legacy.choices[0].finish_reason == "length"  # OpenAI's default
    assert chat.usage.completion_tokens == 40 and chat.choices[0].finish_reason == "stop"  # up to the context


def test_streamed_logprobs(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    with script(scripted_llm, "one two three four five six"):
        stream = scripted.chat.completions.create(model=SCRIPTED, messages=USER, logprobs=True, top_logprobs=1,
                                                  stream=True)
        tokens = [t.token for ch in stream for c in ch.choices if c.logprobs for t in c.logprobs.content]
    assert "".join(tokens) == "one two three four five six"


# ---- cancellation and overload ----


def _running(llm: LLM) -> int:
    return len(llm.scheduler.running) + llm.scheduler.queue_depth


def _wait_idle(llm: LLM, within: float) -> float:
    start = time.monotonic()
    while _running(llm):
        assert time.monotonic() - start < within, "the request still holds its slot"
        time.sleep(0.02)
    return time.monotonic() - start


def test_disconnect_mid_stream_frees_the_slot(scripted_url: str, scripted_llm: LLM) -> None:
    # 1000 tokens at 4 per 50 ms dispatch would take 12 s.
    with script(scripted_llm, " word" * 1000, delay=0.05):
        body = {"model": SCRIPTED, "messages": USER, "stream": True}
        with httpx.stream("POST", f"{scripted_url}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert next(l for l in lines if "word" in l)
            assert _running(scripted_llm) == 1
        _wait_idle(scripted_llm, within=2.0)
        # A non-streaming request whose client gives up is cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{scripted_url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
        _wait_idle(scripted_llm, within=2.0)
    assert httpx.get(f"{scripted_url}/health").status_code == 200


def test_queue_full_answers_503_at_once(scripted_url: str, scripted_llm: LLM) -> None:
    sched = scripted_llm.scheduler
    saved, sched.max_queue = sched.max_queue, 1
    body = {"model": SCRIPTED, "messages": USER, "stream": True}
    try:
        with script(scripted_llm, " word" * 1000, delay=0.05), contextlib.ExitStack() as streams:
            for i in range(5):  # 4 slots busy, then 1 request waiting
                r = streams.enter_context(httpx.stream("POST", f"{scripted_url}/v1/chat/completions", json=body))
                assert r.status_code == 200
                while i < 4 and sched.queue_depth:  # admitted into a slot before the next one comes
                    time.sleep(0.01)
            assert sched.queue_depth == 1 and len(sched.running) == 4
            start = time.monotonic()
            r = httpx.post(f"{scripted_url}/v1/chat/completions", json={**body, "stream": False}, timeout=10)
            assert time.monotonic() - start < 2
            err = assert_error(r, 503)
            assert err["code"] == "overloaded" and err["type"] == "server_error"
            with pytest.raises(openai.InternalServerError):
                openai.OpenAI(base_url=f"{scripted_url}/v1", api_key="x", max_retries=0).chat.completions.create(
                    model=SCRIPTED, messages=USER)
        _wait_idle(scripted_llm, within=2.0)  # the clients left: slots and queue are free again
    finally:
        sched.max_queue = saved
    assert httpx.get(f"{scripted_url}/health").status_code == 200


# ---- errors ----


def _chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **kw}


@pytest.mark.parametrize("body, param", [
    (_chat(max_tokens="3"), "max_tokens"),
    (_chat(temperature=3), "temperature"),
    (_chat(top_logprobs=3), "top_logprobs"),
    (_chat(n=0), "n"),
    (_chat(stop=[f"s{i}" for i in range(65)]), "stop"),
    (_chat(bogus_field=1), "bogus_field"),
    (_chat(stream_options={"include_usage": True}), "stream_options"),
    (_chat(logit_bias={"50": 101}), "logit_bias"),
    (_chat(logit_bias={"x": 1}), "logit_bias"),
    (_chat(min_tokens=3), "min_tokens"),
    (_chat(stop_token_ids=[-1]), "stop_token_ids[0]"),
    (_chat(functions=[{"name": "f"}]), "functions"),
    (_chat(response_format={"type": "json"}), "response_format.type"),
    (_chat(response_format={"type": "json_schema"}), "response_format"),
    (_chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), "response_format.json_schema.name"),
    (_chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
     "response_format"),
    (_chat(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs"),
    (_chat(structured_outputs={"regex": "(unclosed"}), "structured_outputs"),
    (_chat(structured_outputs={"choice": []}), "structured_outputs.choice"),
    (_chat(structured_outputs={"json": "{not json"}), "structured_outputs"),
    (_chat(structured_outputs={"grammar": "start: undefined_rule"}), "structured_outputs"),
    (_chat(response_format={"type": "json_object"}, structured_outputs={"regex": "a"}), "structured_outputs"),
    (_chat(messages=[]), "messages"),
    (_chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0]"),
    (_chat(messages=[{"role": "user"}]), "messages[0].content"),
    (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0].type"),
    (_chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id"),
    (_chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name"),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "tools[0].function.parameters"),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"required": "x"}}}]),
     "tools[0].function.parameters"),
    (_chat(tools=[WEATHER, WEATHER]), "tools"),
    (_chat(tool_choice="required"), "tool_choice"),
    (_chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (_chat(max_tokens=10_000), "max_tokens"),
    (_chat(chat_template_kwargs=["date_string"]), "chat_template_kwargs"),
    (_chat(chat_template_kwargs={"tools_in_user_message": "no"}), "chat_template_kwargs"),
    (_chat(chat_template_kwargs={"builtin_tools": ["calculator"]}), "chat_template_kwargs"),
    (_chat(messages=[{"role": "user", "content": "word " * 400}]), "messages"),
    ({"messages": USER}, "model"),
    ({"model": MODEL}, "messages"),
])
def test_bad_requests(url: str, body: dict, param: str | None) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    err = assert_error(r, 400, param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"),
    (b'{"model": "tiny-llama3", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8"),
    (b'{"model": "tiny-llama3", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    (b"[1, 2]", "object"),
    (b"", "must be a JSON object"),
    (b'{"model": "tiny-llama3", "prompt": "hi", "max_tokens": 1e400}', "integer"),
])
def test_malformed_bodies(url: str, content: bytes, message: str) -> None:
    path = "/v1/completions" if b'"prompt"' in content else "/v1/chat/completions"
    r = httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert message in assert_error(r, 400)["message"]


def test_not_found_and_too_large(url: str, client: openai.OpenAI) -> None:
    err = assert_error(httpx.post(f"{url}/v1/chat/completions", json=_chat(model="gpt-4o")), 404, "model")
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert_error(httpx.get(f"{url}/v1/nothing"), 404)
    assert_error(httpx.get(f"{url}/v1/chat/completions"), 405)
    big = json.dumps(_chat(messages=[{"role": "user", "content": "x" * (5 << 20)}])).encode()
    assert_error(httpx.post(f"{url}/v1/chat/completions", content=big), 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        for _ in range(6):
            yield b" " * (1 << 20)

    assert_error(httpx.post(f"{url}/v1/chat/completions", content=chunked()), 413)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens"
    assert httpx.get(f"{url}/health").status_code == 200


def test_internal_errors_do_not_leak(scripted_url: str, scripted_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kw: Any) -> list[int]:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(scripted_llm.chat_format, "encode_dialog", boom)
    r = httpx.post(f"{scripted_url}/v1/chat/completions", json={"model": SCRIPTED, "messages": USER})
    err = assert_error(r, 500)
    assert "secret" not in r.text and err["type"] == "server_error"
    monkeypatch.undo()
    assert httpx.get(f"{scripted_url}/health").status_code == 200
    r = httpx.post(f"{scripted_url}/v1/chat/completions", json={"model": SCRIPTED, "messages": USER})
    assert r.status_code == 200


def test_engine_failure_fails_requests_in_flight(scripted_url: str, scripted_llm: LLM) -> None:
    body = {"model": SCRIPTED, "messages": USER}
    with script(scripted_llm, "a b c d e f g h i j"):
        scripted_llm.engine.fail_next = True
        err = assert_error(httpx.post(f"{scripted_url}/v1/chat/completions", json=body, timeout=30), 500)
        assert err["code"] == "engine_error" and "fire" not in err["message"]
        scripted_llm.engine.fail_next = True
        r = httpx.post(f"{scripted_url}/v1/chat/completions", json={**body, "stream": True}, timeout=30)
        last = r.text.strip().split("\n\n")[-1]
        assert json.loads(last.removeprefix("data: "))["error"]["code"] == "engine_error"
        _wait_idle(scripted_llm, within=2.0)
        assert httpx.post(f"{scripted_url}/v1/chat/completions", json=body, timeout=30).status_code == 200
    assert httpx.get(f"{scripted_url}/health").status_code == 200


def test_one_server_per_llm(scripted_llm: LLM, scripted_url: str) -> None:
    with pytest.raises(RuntimeError, match="already driven"):
        with TestClient(create_app(scripted_llm, model_name="again")):
            pass


def test_api_keys(tiny_llm: LLM) -> None:
    llm = make_scripted(tiny_llm)
    with live(create_app(llm, model_name=SCRIPTED, api_keys=["k-one", "k-two"], max_body_bytes=1000)) as u:
        for key in ("k-one", "k-two"):
            client = openai.OpenAI(base_url=f"{u}/v1", api_key=key, max_retries=0, timeout=60)
            with script(llm, "Hello there"):
                reply = client.chat.completions.create(model=SCRIPTED, messages=[{"role": "user", "content": "Hi"}])
            assert reply.choices[0].message.content == "Hello there"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{u}/v1", api_key="k-on", max_retries=0).models.list()
        chat = {"model": SCRIPTED, "messages": [{"role": "user", "content": "Hi"}]}
        for headers in ({}, {"Authorization": "k-one"}, {"Authorization": "Basic k-one"},
                        {"Authorization": "Bearer k-one-and-more"}):
            for path in ("/v1/chat/completions", "/v1/responses", "/tokenize", "/nowhere"):
                r = httpx.post(f"{u}{path}", json=chat, headers=headers)
                assert_error(r, 401, param=None)
                assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        # Refused before the body is read: no 413 for a body over the limit without a key.
        assert httpx.post(f"{u}/v1/completions", content=b"x" * 5000).status_code == 401
        assert httpx.post(f"{u}/v1/completions", content=b"x" * 5000,
                          headers={"Authorization": "Bearer k-two"}).status_code == 413
        assert httpx.get(f"{u}/v1/models", headers={"Authorization": "bearer  k-two"}).status_code == 200
        assert httpx.get(f"{u}/health").status_code == 200  # probes and Prometheus need no key
        assert 'endpoint="/v1/chat/completions",status="401"' in httpx.get(f"{u}/metrics").text
    with pytest.raises(ValueError, match="empty"):
        create_app(llm, api_keys=[""])


def test_metrics(url: str) -> None:
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": TEXT, "max_tokens": 1, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200
    assert httpx.post(f"{url}/v1/completions", json={"model": MODEL}, timeout=60).status_code == 400
    text = httpx.get(f"{url}/metrics").text
    for name in ("llama_jax_prompt_tokens_total", "llama_jax_generation_tokens_total", "llama_jax_queue_depth",
                 "llama_jax_batch_occupancy", "llama_jax_time_to_first_token_seconds_bucket",
                 "llama_jax_inter_token_latency_seconds_bucket", "llama_jax_num_preemptions_total"):
        assert name in text
    assert 'llama_jax_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'status="400"' in text and "llama_jax_batch_occupancy 0.0" in text


# ---- the demo model (SmolLM2-135M-Instruct, its own ChatML template), when it is on this machine ----


@pytest.fixture(scope="module")
def demo(smol_checkpoint: Any) -> Iterator[tuple[openai.OpenAI, LLM]]:
    import llama_jax.api

    llm = llama_jax.api.load(smol_checkpoint, dtype="float32", max_slots=2, max_seq_len=256, progress=False,
                             compilation_cache=False)
    with live(create_app(llm, model_name="smollm2")) as u:
        yield openai.OpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=0, timeout=300), llm


@pytest.mark.slow
def test_demo_model_chat(demo: tuple[openai.OpenAI, LLM]) -> None:
    client, llm = demo
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    kw = dict(model="smollm2", messages=messages, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    streamed = accumulate(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    content = full.choices[0].message.content
    assert "Paris" in content and streamed["content"] == content
    assert full.usage.prompt_tokens == len(llm.chat_format.encode_dialog(messages))
    assert full.usage.completion_tokens == len(llm.tokenizer.encode(content))
    details = {"prompt_tokens_details"}
    assert streamed["usage"].model_dump(exclude=details) == full.usage.model_dump(exclude=details)


# ---- fuzzing the request schema ----


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
floats = st.floats(-3, 3)
# Per field: values of the right type (valid or out of range), else anything JSON.
PLAUSIBLE: dict[str, st.SearchStrategy] = {
    "tools": st.lists(st.sampled_from([WEATHER, TIME]) | st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries(
            {"name": st.text(max_size=8)}, optional={"parameters": json_values})}), max_size=2),
    "tool_choice": st.sampled_from(
        ["none", "auto", "required", {"type": "function", "function": {"name": "get_time"}}]),
    "parallel_tool_calls": st.booleans(),
    "n": st.integers(-1, 4),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
    "max_tokens": st.integers(-1, 3000),
    "max_completion_tokens": st.integers(-1, 3000),
    "temperature": floats,
    "top_p": floats,
    "seed": st.integers(),
    "presence_penalty": floats,
    "frequency_penalty": floats,
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(-1, 25),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {
        "type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "properties": {
            "a": {"type": "integer"}}}}}]),
    "structured_outputs": st.sampled_from([{"regex": "[a-z]+"}, {"choice": ["yes", "no"]}, {"json_object": True},
                                           {"grammar": "start: \"x\"+"}, {}]),
    "logit_bias": st.dictionaries(st.text(max_size=3), st.integers(-100, 100), max_size=2),
    "user": st.text(max_size=5),
}
user_messages = st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=30)}),
                         min_size=1, max_size=3)
any_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "x"]), "content": json_values},
    optional={"tool_calls": json_values, "tool_call_id": json_values, "name": json_values}), max_size=3)


@st.composite
def chat_bodies(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {"model": SCRIPTED, "messages": draw(user_messages | any_messages), "max_tokens": 3}
    for field in draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=4, unique=True)):
        body[field] = draw(PLAUSIBLE[field] | json_values)
    # Now and then a required field gets garbage, or an unknown field appears.
    spoil = draw(st.sampled_from([None, None, None, None, "model", "messages", "unknown"]))
    if spoil is not None:
        body[draw(st.text(max_size=8)) if spoil == "unknown" else spoil] = draw(json_values)
    return body


@pytest.fixture(scope="module")
def http(scripted_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=scripted_url, timeout=30) as c:
        yield c


def _post(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    # json.dumps writes NaN and Infinity, which Python's JSON parser (and so FastAPI's) accepts.
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _check(r: httpx.Response) -> None:
    assert r.status_code in (200, 400, 404, 413), (r.status_code, r.text)
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n") or '"error"' in r.text
    else:
        assert r.json()["object"] in ("chat.completion", "text_completion")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=chat_bodies())
def test_fuzz_chat_schema(http: httpx.Client, scripted_llm: LLM, body: Any) -> None:
    with script(scripted_llm, "ok"):
        _check(_post(http, "/v1/chat/completions", body))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({"model": st.just(SCRIPTED), "prompt": st.text(max_size=20) | json_values
                                   | st.lists(st.integers(-5, 130_000), max_size=5)},
                                  optional={"echo": st.booleans() | json_values,
                                            "logprobs": st.integers(-1, 6) | json_values,
                                            "n": st.integers(-1, 3) | json_values, "max_tokens": st.integers(-1, 5),
                                            "stream": st.booleans(), "suffix": json_values,
                                            "best_of": json_values}),
       raw=st.binary(max_size=64))
def test_fuzz_completions_schema(http: httpx.Client, scripted_llm: LLM, body: Any, raw: bytes) -> None:
    with script(scripted_llm, "ok"):
        _check(_post(http, "/v1/completions", body))
        _check(http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}))
    assert http.get("/health").status_code == 200


# ---- /v1/responses (the Responses API, over the chat path) ----

WEATHER_FN = {"type": "function", **WEATHER["function"]}  # the Responses API's flat function tool
TIME_FN = {"type": "function", **TIME["function"]}


def test_responses_text_equals_chat(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    """The same dialog as a chat request: the same prompt tokens and answer; streamed, the client's
    own stream accumulator (which checks the events' order) rebuilds the same response."""
    text = "Hello there, how can I help?"
    kw = dict(model=SCRIPTED, instructions="Be brief.", input="Say something.")
    with script(scripted_llm, text):
        r = scripted.responses.create(**kw)
        chat = scripted.chat.completions.create(
            model=SCRIPTED, messages=[{"role": "system", "content": "Be brief."}, *USER])
        with scripted.responses.stream(**kw) as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
    assert r.status == "completed" and r.object == "response" and r.output_text == text
    assert chat.choices[0].message.content == text
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert "".join(deltas) == text and final.output_text == text and final.status == "completed"
    assert final.usage.output_tokens == r.usage.output_tokens


def test_responses_stream_events_in_order(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    with script(scripted_llm, "Checking. " + TWO_CALLS):
        events = list(scripted.responses.create(model=SCRIPTED, input="Weather and time?",
                                                tools=[WEATHER_FN, TIME_FN], stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["message", "function_call", "function_call"]
    assert [i.name for i in done[1:]] == ["get_weather", "get_time"]
    assert events[-1].response.output == done


def test_responses_function_calls_round_trip(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    """Calls come back as function_call items; the client sends them back with their outputs (as
    OpenAI's function-calling guide does), rendered as the chat dialog with tool results."""
    question = {"role": "user", "content": "Weather in Paris?"}
    with script(scripted_llm, CALL_TEXT):
        r = scripted.responses.create(model=SCRIPTED, input=[question], tools=[WEATHER_FN, TIME_FN])
        streamed = scripted.responses.create(model=SCRIPTED, input=[question], tools=[WEATHER_FN],
                                             stream=True)
        last = list(streamed)[-1].response
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert json.loads(call.arguments) == {"city": "Paris"} and r.status == "completed"
    assert [(i.type, i.name, json.loads(i.arguments)) for i in last.output] == [
        ("function_call", "get_weather", {"city": "Paris"})]
    follow_up = [question, *r.output, {"type": "function_call_output", "call_id": call.call_id,
                                       "output": '{"temp_c": 21}'}]
    with script(scripted_llm, "It is 21 degrees in Paris."):
        answer = scripted.responses.create(model=SCRIPTED, input=follow_up, tools=[WEATHER_FN, TIME_FN])
    assert answer.output_text == "It is 21 degrees in Paris."
    dialog_ = [question, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp_c": 21}'}]
    expected = scripted_llm.chat_format.encode_dialog(dialog_, [WEATHER, TIME])
    assert answer.usage.input_tokens == len(expected)


def test_responses_are_stored_and_continued(scripted: openai.OpenAI, scripted_llm: LLM, scripted_url: str) -> None:
    """previous_response_id continues a stored response's conversation (as OpenAI's
    conversation-state guide does), function calls included; GET and DELETE; store=false."""
    question = {"role": "user", "content": "Weather in Paris?"}
    with script(scripted_llm, CALL_TEXT):
        first = scripted.responses.create(model=SCRIPTED, input=[question], tools=[WEATHER_FN],
                                          instructions="Be brief.")
    (call,) = first.output
    assert first.store and scripted.responses.retrieve(first.id).output[0].call_id == call.call_id
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}
    with script(scripted_llm, "It is 21 degrees."):
        stream = scripted.responses.create(model=SCRIPTED, previous_response_id=first.id, input=[result],
                                           tools=[WEATHER_FN], stream=True)
        second = list(stream)[-1].response
    with script(scripted_llm, "You are welcome."):
        third = scripted.responses.create(model=SCRIPTED, previous_response_id=second.id, input="Thanks!")
    assert second.previous_response_id == first.id and third.output_text == "You are welcome."
    # The third prompt is the whole conversation (without the first request's instructions).
    dialog_ = [question, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."}, {"role": "user", "content": "Thanks!"}]
    assert third.usage.input_tokens == len(scripted_llm.chat_format.encode_dialog(dialog_))
    assert scripted.responses.retrieve(third.id).output_text == "You are welcome."
    # Its input items: the whole chain's, newest first, in pages (the client follows `after`).
    items = list(scripted.responses.input_items.list(third.id, limit=2))
    assert [i.type for i in items] == ["message", "message", "function_call_output", "function_call", "message"]
    assert [i.role for i in items if i.type == "message"] == ["user", "assistant", "user"]
    assert items[0].content[0].text == "Thanks!" and items[1].content[0].text == "It is 21 degrees."
    assert items[3].call_id == call.call_id and items[3].id == call.id and items[2].output == '{"temp_c": 21}'
    assert len({i.id for i in items}) == 5 and all(i.status == "completed" for i in items)
    asc = scripted.responses.input_items.list(third.id, order="asc")
    assert [i.id for i in asc.data] == [i.id for i in reversed(items)] and not asc.has_more
    assert [i.id for i in scripted.responses.input_items.list(first.id).data] == [items[-1].id]
    for query, param in [("limit=0", "limit"), ("order=up", "order"), ("after=msg_nope", "after")]:
        assert_error(httpx.get(f"{scripted_url}/v1/responses/{third.id}/input_items?{query}"), 400, param)
    scripted.responses.delete(third.id)
    with pytest.raises(openai.NotFoundError):
        scripted.responses.retrieve(third.id)
    with script(scripted_llm, "Not kept."):
        unstored = scripted.responses.create(model=SCRIPTED, input="Hi", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        scripted.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError, match="not found"):
        scripted.responses.create(model=SCRIPTED, previous_response_id=unstored.id, input="Hi")


def test_background_responses(scripted: openai.OpenAI, scripted_llm: LLM, scripted_url: str) -> None:
    """background=true answers at once (queued); the response generates with no client attached,
    GET shows it finished, and cancel stops one that runs (its slot freed)."""
    with script(scripted_llm, "Done in the background.", delay=0.25):  # still running at the next request
        queued = scripted.responses.create(model=SCRIPTED, input="Hi", background=True)
        assert queued.status in ("queued", "in_progress") and queued.background and queued.output == []
        with pytest.raises(openai.BadRequestError, match="still in progress"):
            scripted.responses.create(model=SCRIPTED, input="And?", previous_response_id=queued.id)
        _wait_idle(scripted_llm, within=10.0)
    done = scripted.responses.retrieve(queued.id)
    assert done.status == "completed" and done.output_text == "Done in the background." and done.usage.output_tokens
    assert scripted.responses.cancel(queued.id).status == "completed"  # finished: returned as it is
    with script(scripted_llm, "Follow-up."):
        follow = scripted.responses.create(model=SCRIPTED, input="And?", previous_response_id=queued.id)
    assert follow.output_text == "Follow-up."
    with script(scripted_llm, " word" * 1000, delay=0.05):  # 12 s at 4 tokens per 50 ms
        running = scripted.responses.create(model=SCRIPTED, input="Hi", background=True)
        deadline = time.monotonic() + 10
        while scripted.responses.retrieve(running.id).status != "in_progress":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        cancelled = scripted.responses.cancel(running.id)
        assert cancelled.status == "cancelled" and scripted.responses.retrieve(running.id).status == "cancelled"
        _wait_idle(scripted_llm, within=2.0)
        again = scripted.responses.create(model=SCRIPTED, input="Hi", background=True)
        scripted.responses.delete(again.id)  # deleting a running one stops it too
        _wait_idle(scripted_llm, within=2.0)
    with script(scripted_llm, "Kept."):
        plain = scripted.responses.create(model=SCRIPTED, input="Hi")
    with pytest.raises(openai.BadRequestError, match="only background responses can be cancelled"):
        scripted.responses.cancel(plain.id)
    with pytest.raises(openai.NotFoundError):
        scripted.responses.cancel("resp_nope")


def test_background_responses_stream_and_resume(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    """background with stream: a client may leave the stream while the response goes on
    generating, and take it up again after any sequence number (GET ?stream=true&starting_after=N),
    or read it all again once finished; a cancelled one's streams end."""
    with script(scripted_llm, "Streamed in the background.", delay=0.05):
        first = []
        with scripted.responses.create(model=SCRIPTED, input="Hi", background=True, stream=True) as stream:
            for ev in stream:
                first.append(ev)
                if len(first) == 4:
                    break  # the client leaves
        rid = first[0].response.id
        rest = list(scripted.responses.retrieve(rid, stream=True, starting_after=first[-1].sequence_number))
    assert [e.type for e in first[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert first[0].response.status == "queued" and first[0].response.background
    everything = first + rest
    assert [e.sequence_number for e in everything] == list(range(len(everything)))
    assert "".join(e.delta for e in everything if e.type == "response.output_text.delta") == \
        "Streamed in the background."
    assert rest[-1].type == "response.completed" and rest[-1].response.output_text == "Streamed in the background."
    assert scripted.responses.retrieve(rid).status == "completed"
    again = list(scripted.responses.retrieve(rid, stream=True))  # from the start, finished
    assert [e.model_dump() for e in again] == [e.model_dump() for e in everything]
    with script(scripted_llm, " word" * 1000, delay=0.05):  # 12 s at 4 tokens per 50 ms
        with scripted.responses.create(model=SCRIPTED, input="Hi", background=True, stream=True) as stream:
            events = iter(stream)
            long_id = next(events).response.id
            assert any(ev.type == "response.output_text.delta" for ev in events)  # generating
            assert scripted.responses.cancel(long_id).status == "cancelled"
            tail = [ev.type for ev in events]  # the stream ends with the response
        assert "response.completed" not in tail
        assert list(scripted.responses.retrieve(long_id, stream=True))[-1].type != "response.completed"
        _wait_idle(scripted_llm, within=2.0)
        with scripted.responses.create(model=SCRIPTED, input="Hi", background=True, stream=True) as stream:
            events = iter(stream)
            gone = next(events).response.id
            assert any(ev.type == "response.output_text.delta" for ev in events)
            scripted.responses.delete(gone)  # deleting it stops it, and ends its streams
            assert "response.completed" not in [ev.type for ev in events]
        _wait_idle(scripted_llm, within=2.0)
    with script(scripted_llm, "Polled."):
        polled = scripted.responses.create(model=SCRIPTED, input="Hi", background=True)
        with pytest.raises(openai.BadRequestError, match="only those can be streamed again"):
            list(scripted.responses.retrieve(polled.id, stream=True))
        _wait_idle(scripted_llm, within=10.0)


def test_a_stopped_background_response_stays_stopped() -> None:
    """Cancel stops the engine requests itself (a task cancellation can be lost in Python 3.11's
    asyncio.wait_for): a task that goes on anyway cannot put its response back, nor its status."""
    from llama_jax.server.responses import ResponseStore

    async def scenario() -> tuple[dict, list[str]]:
        store, calls = ResponseStore(), []
        store.put({"id": "r", "status": "queued", "background": True}, [], [])
        release = asyncio.Event()

        async def stubborn() -> None:
            while True:
                try:
                    await release.wait()
                    break
                except asyncio.CancelledError:  # swallowed, as a lost cancellation would be
                    calls.append("cancel swallowed")
            store.set_status("r", "in_progress")
            store.put({"id": "r", "status": "completed", "background": True}, [], [])

        store.run("r", stubborn(), cleanup=lambda: (calls.append("engine requests cancelled"), release.set()))
        await asyncio.sleep(0)
        cancelled = await store.cancel("r")
        return cancelled, calls

    cancelled, calls = asyncio.run(scenario())
    assert cancelled["status"] == "cancelled"
    assert calls[0] == "engine requests cancelled" and "cancel swallowed" in calls


def test_response_store_keeps_the_latest() -> None:
    from llama_jax.server.responses import ResponseStore

    store = ResponseStore(size=2)
    for rid in ("a", "b", "c"):
        store.put({"id": rid}, [], [])
    assert store.response("c") == {"id": "c"} and store.response("b") == {"id": "b"}
    with pytest.raises(APIError):
        store.response("a")


def test_responses_tool_limits_and_choice(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    kw = dict(model=SCRIPTED, input="Weather and time?", tools=[WEATHER_FN, TIME_FN])
    with script(scripted_llm, TWO_CALLS):
        both = scripted.responses.create(**kw)
        one = scripted.responses.create(**kw, parallel_tool_calls=False)
        capped = scripted.responses.create(**kw, max_tool_calls=1, stream=True)
        capped = list(capped)[-1].response
        none = scripted.responses.create(**kw, tool_choice="none")
    assert [i.name for i in both.output] == ["get_weather", "get_time"]
    assert [i.name for i in one.output] == [i.name for i in capped.output] == ["get_weather"]
    assert none.output_text == TWO_CALLS and none.tool_choice == "none"
    with script(scripted_llm, '{"name": "get_time", "parameters": {"tz": "UTC"}}'):
        named = scripted.responses.create(**kw, tool_choice={"type": "function", "name": "get_time"})
    assert [i.name for i in named.output] == ["get_time"]


def test_responses_incomplete_and_logprobs(scripted: openai.OpenAI, scripted_llm: LLM) -> None:
    with script(scripted_llm, "one two three four five six seven"):
        cut = scripted.responses.create(model=SCRIPTED, input="Count.", max_output_tokens=3)
        events = list(scripted.responses.create(model=SCRIPTED, input="Count.", max_output_tokens=3, stream=True))
        lp = scripted.responses.create(model=SCRIPTED, input="Count.", top_logprobs=2,
                                       include=["message.output_text.logprobs"])
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3 and cut.output[0].status == "incomplete"
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == cut.output_text
    (part,) = lp.output[0].content
    assert len(part.logprobs) == lp.usage.output_tokens
    assert "".join(t.token for t in part.logprobs) == part.text
    assert all(len(t.top_logprobs) == 2 for t in part.logprobs)


def test_responses_structured_output(client: openai.OpenAI) -> None:
    """text.format json_schema on the random model (its output must match), and the client's
    `responses.parse` into a pydantic model."""
    import pydantic

    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    r = client.responses.create(model=MODEL, input="Describe someone.", text=fmt, max_output_tokens=200,
                                temperature=1.0, extra_body={"seed": 4})
    assert_person(r.output_text)
    assert r.text.format.type == "json_schema"

    class Pet(pydantic.BaseModel):
        kind: Literal["cat", "dog", "fish"]
        legs: int = pydantic.Field(ge=0, le=8)

    parsed = client.responses.parse(model=MODEL, input="A pet?", text_format=Pet, max_output_tokens=100,
                                    temperature=1.0, extra_body={"seed": 1}).output_parsed
    assert isinstance(parsed, Pet)


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
    ({"input": []}, "input"),
    ({"input": "x", "max_output_tokens": 10**6}, "max_output_tokens"),
    ({"input": "word " * 3000}, "input"),
    ({"input": "x", "background": True, "store": False}, "background"),
])
def test_responses_bad_requests(scripted_url: str, body: dict, param: str) -> None:
    r = httpx.post(f"{scripted_url}/v1/responses", json={"model": SCRIPTED, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param), err
    r = httpx.post(f"{scripted_url}/v1/responses", json={"model": "other", "input": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# ---- /tokenize and /detokenize (vLLM's) ----


def test_chat_template_kwargs(scripted: openai.OpenAI, scripted_url: str, scripted_llm: LLM) -> None:
    """vLLM's chat_template_kwargs: the Llama 3.1 template's variables, in /tokenize and chat alike;
    built-in tools declared by `builtin_tools` are called like those given in `tools`."""
    kwargs = {"tools_in_user_message": False, "date_string": "26 Jul 2024", "builtin_tools": ["brave_search"]}
    ids = scripted_llm.chat_format.encode_dialog(USER, [WEATHER], chat_template_kwargs=kwargs)
    assert ids != scripted_llm.chat_format.encode_dialog(USER, [WEATHER])
    r = httpx.post(f"{scripted_url}/tokenize", json={"model": SCRIPTED, "messages": USER, "tools": [WEATHER],
                                                     "chat_template_kwargs": kwargs}, timeout=30).json()
    assert r["tokens"] == ids
    kw = dict(model=SCRIPTED, messages=USER, tools=[WEATHER], extra_body={"chat_template_kwargs": kwargs})
    with script(scripted_llm, '<|python_tag|>brave_search.call(query="jax 1.0")'):
        full = scripted.chat.completions.create(**kw)
        streamed = accumulate(scripted.chat.completions.create(**kw, stream=True))
        plain = scripted.chat.completions.create(**{**kw, "extra_body": {}})
        direct = scripted_llm.chat(USER, [WEATHER], chat_template_kwargs=kwargs)
        direct_stream = list(scripted_llm.chat_stream(USER, chat_template_kwargs=kwargs))
    assert full.usage.prompt_tokens == len(ids) and full.choices[0].finish_reason == "tool_calls"
    (call,) = full.choices[0].message.tool_calls
    assert call.function.name == "brave_search" and json.loads(call.function.arguments) == {"query": "jax 1.0"}
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"]] == [("brave_search",
                                                                                     {"query": "jax 1.0"})]
    assert plain.choices[0].message.tool_calls is None  # not declared: plain text
    # The Python API the same way.
    assert direct.completion.prompt_tokens == len(ids)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in direct.tool_calls] == [
        ("brave_search", {"query": "jax 1.0"})]
    assert direct_stream[-1]["finish_reason"] == "tool_calls"
    bad = httpx.post(f"{scripted_url}/tokenize", json={"model": SCRIPTED, "prompt": "x",
                                                       "chat_template_kwargs": {"date_string": "x"}}, timeout=30)
    assert_error(bad, 400, None)


def test_served_chat_template(tiny_llm: LLM) -> None:
    """--chat-template: a Jinja template in place of the Llama 3.1 format, kwargs included."""
    template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
                "{{ m.content }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
                "<|end_header_id|>\n\n{% if house_style is defined %}[{{ house_style }}] {% endif %}{% endif %}")
    llm = make_scripted(tiny_llm, chat_template=template)
    tok = llm.tokenizer
    expected = tok.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nSay something.<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n[terse] ", allow_special=True)
    defaults = {"house_style": "plain"}  # --default-chat-template-kwargs: a request's own win
    with live(create_app(llm, model_name=SCRIPTED, default_chat_template_kwargs=defaults)) as u:
        client = openai.OpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=0, timeout=60)
        with script(llm, "Fine."):
            r = client.chat.completions.create(model=SCRIPTED, messages=USER,
                                               extra_body={"chat_template_kwargs": {"house_style": "terse"}})
        assert r.choices[0].message.content == "Fine." and r.usage.prompt_tokens == len(expected)
        body = {"model": SCRIPTED, "messages": USER, "chat_template_kwargs": {"house_style": "terse"}}
        assert httpx.post(f"{u}/tokenize", json=body, timeout=30).json()["tokens"] == expected
        plain = httpx.post(f"{u}/tokenize", json={**body, "chat_template_kwargs": None}, timeout=30).json()
        assert tok.decode(plain["tokens"]).endswith("[plain] ")
        taken = httpx.post(f"{u}/v1/chat/completions", json={**body, "chat_template_kwargs": {"messages": []}},
                           timeout=30)
        assert "may not set ['messages']" in assert_error(taken, 400, "chat_template_kwargs")["message"]
    with pytest.raises(ChatTemplateError, match="does not compile"):
        LLM(tiny_llm.config, tiny_llm.params, tok, max_slots=1, max_seq_len=64, chat_template="{% for %}")


def test_tokenize_counts_what_a_request_would_run(scripted: openai.OpenAI, scripted_url: str,
                                                  scripted_llm: LLM) -> None:
    def post(path: str, **body: Any) -> httpx.Response:
        return httpx.post(f"{scripted_url}{path}", json={"model": SCRIPTED, **body}, timeout=30)

    r = post("/tokenize", prompt="Hello <|eot_id|> world", return_token_strs=True).json()
    assert r["tokens"] == scripted_llm.encode_prompt("Hello <|eot_id|> world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == scripted_llm.max_seq_len and "".join(r["token_strs"][1:]) == "Hello <|eot_id|> world"
    bare = post("/tokenize", prompt="Hello", add_special_tokens=False).json()["tokens"]
    assert bare == scripted_llm.tokenizer.encode("Hello")
    chat = post("/tokenize", messages=USER, tools=[WEATHER]).json()
    assert chat["tokens"] == scripted_llm.chat_format.encode_dialog(USER, [WEATHER])
    with script(scripted_llm, "Hi."):
        usage = scripted.chat.completions.create(model=SCRIPTED, messages=USER, tools=[WEATHER]).usage
    assert usage.prompt_tokens == chat["count"]
    no_header = post("/tokenize", messages=USER, add_generation_prompt=False).json()
    assert no_header["tokens"] == scripted_llm.chat_format.encode_dialog(USER, add_generation_prompt=False)
    assert post("/detokenize", tokens=bare).json() == {"prompt": "Hello"}
    for path, body, param in [("/tokenize", {"prompt": "x", "messages": USER}, None),
                              ("/tokenize", {"prompt": "x", "tools": [WEATHER]}, None),
                              ("/tokenize", {"prompt": ""}, "prompt"),
                              ("/detokenize", {"tokens": [10**7]}, "tokens")]:
        r = post(path, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.post(f"{scripted_url}/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
