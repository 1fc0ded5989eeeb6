"""The Python API on the demo model: greedy output equals transformers', batching, streaming,
stop conditions and argument validation."""

import json

import jax
import numpy as np
import pytest
import torch

import llama_jax
from llama_jax import SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three uses of copper."]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def llm(smol_checkpoint):
    return llama_jax.load(smol_checkpoint, dtype="float32", max_slots=4, max_seq_len=512, progress=False)


def _chat_ids(llm, text):
    return llm.chat_format.encode_dialog([{"role": "user", "content": text}])


@pytest.mark.slow
def test_batched_greedy_equals_transformers_generate(llm, smol_reference):
    _, model = smol_reference
    prompts = [_chat_ids(llm, p) for p in PROMPTS]
    ours = llm.generate(prompts, SamplingParams.greedy(max_tokens=NEW_TOKENS))
    for prompt, out in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        ref = ref[0, len(prompt):].tolist()
        if ref[-1] in llm.tokenizer.stop_ids:  # transformers keeps the end-of-turn token; we report it as "stop"
            assert out.finish_reason == "stop"
            ref = ref[:-1]
        assert out.token_ids == ref


def test_chat_answers_and_stops_on_end_of_turn(llm):
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=40)
    assert "Paris" in reply.content
    assert reply.finish_reason == "stop" and reply.tool_calls == []
    assert reply.completion.completion_tokens < 40
    # A prefilled answer: the model goes on from the assistant's unfinished text.
    prefilled = [{"role": "user", "content": "What is the capital of France?"},
                 {"role": "assistant", "content": "The capital of France is"}]
    more = llm.chat(prefilled, temperature=0, max_tokens=8, continue_final_message=True)
    assert more.content.lstrip().startswith("Paris"), more.content
    # Several conversations at once (as vLLM's LLM.chat), each as it would be alone.
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    settings = [SamplingParams.greedy(max_tokens=10), SamplingParams(temperature=0.8, seed=5, max_tokens=10)]
    together = llm.chat(conversations, sampling=settings)
    alone = [llm.chat(c, sampling=sp) for c, sp in zip(conversations, settings)]
    assert [r.completion.token_ids for r in together] == [r.completion.token_ids for r in alone]
    with pytest.raises(ValueError, match="2 sampling settings .* for 3 conversations"):
        llm.chat([*conversations, conversations[0]], sampling=settings)


def test_speculative_decoding_keeps_the_answers(llm):
    """Real weights: with n-gram drafts verified, a proofreading answer (which repeats its prompt)
    is token for token the one plain decoding gives, greedy and sampled, with most drafts kept."""
    text = ("The keeper climbed the two hundred steps every evening, cleaned the lens and lit the lamp, wether "
            "the sea was calm or wild, and the ships steered by it's light.")
    messages = [{"role": "user", "content": f"Fix the spelling mistakes and output the corrected text:\n\n{text}"}]
    settings = [dict(temperature=0, max_tokens=40), dict(temperature=0.7, top_p=0.9, seed=3, max_tokens=40)]
    plain = [llm.chat(messages, **kw).completion.token_ids for kw in settings]
    llm.engine.speculation = llama_jax.NgramSpeculation(num_tokens=4)
    try:
        spec = [llm.chat(messages, **kw).completion.token_ids for kw in settings]
    finally:
        llm.engine.speculation = None
    assert spec == plain
    assert llm.engine.accepted >= 20 and llm.engine.accepted >= llm.engine.drafted / 2, (
        llm.engine.accepted, llm.engine.drafted)


def test_batch_equals_alone_and_stream_equals_whole(llm):
    greedy = SamplingParams.greedy(max_tokens=12, ignore_eos=True)
    prompts = [_chat_ids(llm, p) for p in PROMPTS]
    batch = llm.generate(prompts, greedy)
    for prompt, out in zip(prompts, batch):
        alone = llm.generate(prompt, greedy)
        assert alone.token_ids == out.token_ids
        events = list(llm.generate_stream(prompt, greedy))
        assert "".join(e.text for e in events) == out.text
        assert [t for e in events for t in e.token_ids] == out.token_ids
        assert events[-1].finish_reason == "length"


def test_scanned_layers_generate_the_same(llm, smol_checkpoint):
    """load(scan_layers=True) keeps the weights stacked under one lax.scan: same tokens and logits."""
    assert isinstance(llm.params["layers"], tuple) and len(llm.params["layers"]) == llm.config.n_layers
    scanned = llama_jax.load(smol_checkpoint, dtype="float32", max_slots=1, max_seq_len=128, progress=False,
                             scan_layers=True)
    assert isinstance(scanned.params["layers"], dict) and scanned.params["layers"]["wq"].shape[0] == 30
    greedy = SamplingParams.greedy(max_tokens=16, ignore_eos=True)
    prompt = _chat_ids(llm, PROMPTS[0])
    assert scanned.generate(prompt, greedy).token_ids == llm.generate(prompt, greedy).token_ids
    np.testing.assert_allclose(scanned.logits([prompt]), llm.logits([prompt]), rtol=1e-4, atol=1e-4)


def test_per_prompt_sampling_and_seeds(llm):
    prompt = _chat_ids(llm, "Tell me a story.")
    hot = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, seed=1234, ignore_eos=True)
    a, b, c = llm.generate([prompt, prompt, prompt], [hot, hot, hot.replace(seed=99)])
    assert a.token_ids == b.token_ids != c.token_ids
    assert llm.generate(prompt, hot).token_ids == a.token_ids  # the seed, not the batch, fixes the stream


def test_stop_strings_are_cut_and_logprobs_reported(llm):
    prompt = _chat_ids(llm, "Count from 1 to 20, separated by commas.")
    full = llm.generate(prompt, SamplingParams.greedy(max_tokens=30, ignore_eos=True, logprobs=True, top_logprobs=3))
    assert len(full.logprobs) == 30 and all(len(lp.top) == 3 for lp in full.logprobs)
    assert all(lp.top[0][1] >= lp.logprob - 1e-5 for lp in full.logprobs)  # greedy takes the best
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = llm.generate(prompt, SamplingParams.greedy(max_tokens=30, ignore_eos=True, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_tokens": -1}, "max_tokens"), ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p")],
)
def test_bad_arguments_are_refused(llm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llm.generate("Hello", **kwargs)


def test_bad_prompts_are_refused(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("")
    with pytest.raises(ValueError, match="context"):
        llm.generate([1] * 600)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([1, 10**9])


def test_a_failed_or_interrupted_step_leaves_the_llm_usable(llm, monkeypatch):
    """An engine failure that took the donated cache with it, or a Ctrl-C during a batch: the
    call raises, nothing stays queued or running, and the next call gives the usual answer."""
    greedy = SamplingParams.greedy(max_tokens=12, ignore_eos=True)
    prompts = [_chat_ids(llm, p) for p in PROMPTS]
    want = [o.token_ids for o in llm.generate(prompts, greedy)]
    engine, sched = llm.engine, llm.scheduler
    decode = engine._decode

    def broken(*args, **kw):  # a runtime failure after the inputs were donated
        jax.tree.map(lambda a: a.delete(), engine.cache)
        raise RuntimeError("device failure")

    monkeypatch.setattr(engine, "_decode", broken)
    with pytest.raises(RuntimeError, match="device failure"):
        llm.generate(prompts, greedy)
    monkeypatch.setattr(engine, "_decode", decode)
    assert not sched.has_work() and not sched.running and engine.free_slots() == list(range(engine.max_slots))
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == want

    consume, calls = sched._consume, [0]

    def interrupted(*args, **kw):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return consume(*args, **kw)

    monkeypatch.setattr(sched, "_consume", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts * 2, greedy)  # 4 slots: two prompts still queued
    monkeypatch.setattr(sched, "_consume", consume)
    assert len(sched.waiting) == 2 and all(r.cancelled for r in sched.waiting)
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == want
    assert not sched.has_work() and not sched._by_id


def test_compilation_cache_is_on(llm):
    assert jax.config.jax_compilation_cache_dir


def test_generate_script_prints_an_answer(smol_checkpoint):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "generate.py"
    out = subprocess.run(
        [sys.executable, str(script), "--ckpt", str(smol_checkpoint), "--temperature", "0", "--max-tokens", "32",
         "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
         "What is the capital of France?"], capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "time to first token" in out.stderr and "tokens/s" in out.stderr and "draft tokens kept" in out.stderr
    bad = subprocess.run([sys.executable, str(script), "--top-p", "2", "hi"], capture_output=True, text=True)
    assert bad.returncode != 0 and "top_p" in bad.stderr


def test_generate_script_follows_a_json_schema(smol_checkpoint, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "generate.py"
    schema = tmp_path / "capital.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
                                  "required": ["capital"], "additionalProperties": False}))
    base = [sys.executable, str(script), "--ckpt", str(smol_checkpoint), "--temperature", "0", "--max-tokens", "40"]
    out = subprocess.run([*base, "--json-schema", str(schema), "What is the capital of France?"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert list(json.loads(out.stdout)) == ["capital"]
    bad = subprocess.run([*base, "--regex", "(", "hi"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "invalid structured output" in bad.stderr
    unreadable = subprocess.run([*base, "--json-schema", str(tmp_path / "missing.json"), "hi"],
                                capture_output=True, text=True)
    assert unreadable.returncode == 2 and "--json-schema" in unreadable.stderr
    # A chat template that is not there fails before the weights load.
    no_template = subprocess.run([*base, "--chat-template", str(tmp_path / "missing.jinja"), "hi"],
                                 capture_output=True, text=True, timeout=600)
    assert no_template.returncode == 1 and "missing.jinja': no such file" in no_template.stderr


@pytest.mark.slow
def test_constrained_greedy_equals_the_masked_argmax_of_transformers(llm, smol_reference):
    """Structured output on the real model: each greedy token is transformers' argmax over the
    tokens llguidance allows there, and the answer is JSON that follows the schema."""
    from llama_jax import StructuredOutput
    from llama_jax.structured import GrammarCompiler

    _, model = smol_reference
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "population", "capital"], "additionalProperties": False}
    so = StructuredOutput(json=schema)
    prompt = _chat_ids(llm, "Describe Paris as JSON with its city name, population and whether it is a capital.")
    ours = llm.generate(prompt, SamplingParams.greedy(max_tokens=60, structured_output=so))
    answer = json.loads(ours.text)
    assert list(answer) == ["city", "population", "capital"] and ours.finish_reason == "stop"
    assert isinstance(answer["population"], int) and isinstance(answer["capital"], bool)

    matcher = GrammarCompiler(llm.tokenizer, llm.config.vocab_size).matcher(so)
    ids, ref = list(prompt), []
    while not matcher.finished and len(ref) < 60:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].numpy()
        allowed = np.unpackbits(matcher.mask().view(np.uint8), bitorder="little")[: len(logits)].astype(bool)
        token = int(np.where(allowed, logits, -np.inf).argmax())
        if token in llm.tokenizer.stop_ids:
            break
        assert matcher.advance(token)
        ids.append(token)
        ref.append(token)
    assert ours.token_ids == ref


def test_the_next_turn_of_a_chat_is_prefilled_from_where_the_last_stopped(llm, smol_checkpoint):
    """The second turn reuses the first's cache rows (prompt and answer) and answers as a
    fresh prefill of the whole conversation does."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first = llm.chat(messages, temperature=0, max_tokens=30)
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": "And what is the capital of Italy?"}]
    second = llm.chat(messages, temperature=0, max_tokens=30, logprobs=True)
    previous = len(_chat_ids(llm, "What is the capital of France?")) + first.completion.completion_tokens
    assert first.completion.cached_tokens == 0 and second.completion.cached_tokens >= previous - 2
    llm.scheduler.prefix_reuse = False
    try:
        fresh = llm.chat(messages, temperature=0, max_tokens=30, logprobs=True)
    finally:
        llm.scheduler.prefix_reuse = True
    assert fresh.completion.cached_tokens == 0
    assert second.completion.token_ids == fresh.completion.token_ids and "Rome" in second.content
    np.testing.assert_allclose([lp.logprob for lp in second.completion.logprobs],
                               [lp.logprob for lp in fresh.completion.logprobs], atol=1e-3)
