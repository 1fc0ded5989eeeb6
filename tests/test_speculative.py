"""Speculative decoding by prompt lookup: the drafts, and outputs equal to plain decoding (greedy,
seeded sampling, penalties, min_tokens, logprobs) with drafts accepted along the way."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from fastapi.testclient import TestClient
from flax import nnx

from llama_jax.api import LLM
from llama_jax.config import LlamaConfig
from llama_jax.engine import Engine
from llama_jax.model import Llama
from llama_jax.sampling import SamplingParams
from llama_jax.scheduler import Request, Scheduler
from llama_jax.server import create_app
from llama_jax.speculative import NgramSpeculation, ngram_draft
from llama_jax.tokenizer import llama3_tokenizer


def test_ngram_draft_takes_the_latest_match_of_the_longest_tail() -> None:
    seq = np.array([1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 1, 2, 3, 4])
    assert ngram_draft(seq, 3, 2, 4).tolist() == [5, 9, 2]  # 1 2 3 4 matched whole at the start
    assert ngram_draft(seq, 3, 1, 3).tolist() == [7, 8, 1]  # 2 3 4: the later of two matches
    assert ngram_draft(seq, 10, 2, 4).tolist() == [5, 9, 2, 3, 4, 7, 8, 1, 2, 3]  # k tokens, no more
    assert ngram_draft(np.array([1, 2, 1, 2]), 5, 2, 4).tolist() == [1, 2]  # up to the end
    assert ngram_draft(np.array([5, 6, 7, 5]), 3, 2, 4).size == 0  # only a 1-token match: below min_n
    assert ngram_draft(np.array([5, 6, 7, 5]), 3, 1, 4).tolist() == [6, 7, 5]
    assert ngram_draft(np.array([5]), 3, 1, 4).size == 0
    rng = np.random.default_rng(0)
    for _ in range(200):  # against a direct search
        seq = rng.integers(0, 4, rng.integers(2, 30))
        lo, hi = sorted(rng.integers(1, 5, 2))
        want = np.zeros(0, seq.dtype)
        for n in range(min(hi, len(seq) - 1), lo - 1, -1):
            tail = seq[len(seq) - n:].tolist()
            ends = [e for e in range(n - 1, len(seq) - 1) if seq[e - n + 1 : e + 1].tolist() == tail]
            if ends:
                want = seq[ends[-1] + 1 : ends[-1] + 4]
                break
        assert ngram_draft(seq, 3, lo, hi).tolist() == want.tolist()


def test_vllm_speculative_config() -> None:
    spec = NgramSpeculation.from_config('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}')
    assert spec == NgramSpeculation(num_tokens=5, prompt_lookup_max=3, prompt_lookup_min=2)
    assert NgramSpeculation.from_config({"num_speculative_tokens": 2, "prompt_lookup_min": 6}).prompt_lookup_max == 6
    for bad, match in [('{"method": "eagle", "num_speculative_tokens": 2}', "not supported"),
                       ('{"prompt_lookup_max": 2}', "needs num_speculative_tokens"),
                       ('{"num_speculative_tokens": 0}', ">= 1"),
                       ('{"num_speculative_tokens": 2, "model": "x"}', "unknown speculative config keys"),
                       ('{"num_speculative_tokens": "2"}', "must be an integer"),
                       ('{"num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}', "<="),
                       ("[1]", "JSON object"), ("{oops", "not JSON")]:
        with pytest.raises(ValueError, match=match):
            NgramSpeculation.from_config(bad)


@pytest.fixture(scope="module")
def tiny():
    config = LlamaConfig.from_preset("tiny")  # 512 ids: no stop token can be sampled
    return config, Llama(config, rngs=nnx.Rngs(3), dtype=jnp.float32).params(), llama3_tokenizer()


def _engine(tiny, speculation=None):
    config, params, _ = tiny
    return Engine(config, params, max_slots=4, max_seq_len=256, decode_steps=4, prefill_buckets=(16, 32),
                  speculation=speculation)


def _serve(engine, tokenizer, requests):
    sched = Scheduler(engine, tokenizer, prefix_reuse=False)
    for r in requests:
        sched.add(r)
    while sched.has_work():
        sched.step()


def _requests():
    rng = np.random.default_rng(7)
    motif = rng.integers(0, 512, 6).tolist()
    prompts = [motif * 4, rng.integers(0, 512, 9).tolist() + motif * 3, motif * 2 + [1, 2, 3]]
    settings = [
        SamplingParams.greedy(max_tokens=64),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=33, seed=5, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=37, frequency_penalty=0.4, repetition_penalty=1.2,
                       presence_penalty=0.3, min_tokens=20, stop_token_ids=(int(motif[0]),)),
    ]
    requests = [Request(p, s) for p, s in zip(prompts, settings)]
    logprobs: list[list] = [[] for _ in requests]
    for r, lps in zip(requests, logprobs):
        r.on_event = lambda e, lps=lps: lps.extend(e.logprobs or [])
    return requests, logprobs


def test_speculative_decoding_equals_plain_decoding(tiny):
    """Alone and batched (where a verify gives undrafted rows one token), for greedy, seeded
    sampling with logprobs, and penalties with min_tokens."""
    plain = _engine(tiny)
    spec = _engine(tiny, NgramSpeculation(num_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1))
    for pick in ([0], [0, 1, 2]):
        (a, a_lp), (b, b_lp) = _requests(), _requests()
        _serve(plain, tiny[2], [a[i] for i in pick])
        _serve(spec, tiny[2], [b[i] for i in pick])
        for i in pick:
            assert b[i].output == a[i].output and len(a[i].output) == a[i].sampling.max_tokens
        if 1 in pick:
            assert len(b_lp[1]) == len(a_lp[1]) == 33
            for x, y in zip(a_lp[1], b_lp[1]):
                assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
                assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert spec.accepted >= 10, f"{spec.accepted} draft tokens kept: the verify path was hardly exercised"
    assert spec.accepted <= spec.drafted


def test_verify_keeps_drafts_the_sampler_draws_and_reports_logprobs(tiny):
    """Engine level: a draft equal to the greedy continuation is kept whole (plus one token), a
    wrong token ends it, and the log-probabilities match plain decode's."""
    config, params, _ = tiny
    prompt = np.random.default_rng(1).integers(0, 512, 12).tolist()
    greedy = SamplingParams.greedy(logprobs=True)
    plain = Engine(config, params, max_slots=2, max_seq_len=128, decode_steps=6, prefill_buckets=(16,))
    first = int(plain.prefill(0, prompt, greedy, 0).tokens[0, 0])
    ref = plain.decode(want_logprobs=True)
    want = [first, *ref.tokens[:, 0].tolist()]  # the greedy sequence: 7 tokens

    spec = Engine(config, params, max_slots=2, max_seq_len=128, decode_steps=6, prefill_buckets=(16,),
                  speculation=NgramSpeculation(num_tokens=3))
    spec.prefill(0, prompt, greedy, 0)
    out = spec.verify({0: want[1:4]}, want_logprobs=True)  # all three right: 4 tokens
    assert out.counts[0] == 4 and out.tokens[:, 0].tolist() == want[1:5]
    np.testing.assert_allclose(out.logprobs[:, 0], ref.logprobs[:4, 0], atol=1e-4)
    np.testing.assert_array_equal(out.top_ids[:, 0], ref.top_ids[:4, 0])
    wrong = (want[6] + 1) % 512
    out = spec.verify({0: [want[5], wrong]})  # one right, then wrong: 2 tokens, the second is the model's
    assert out.counts[0] == 2 and out.tokens[:2, 0].tolist() == want[5:7]
    assert spec.slot_pos[0] == len(prompt) + 6 and spec.held_tokens(0) == len(prompt) + 6
    assert (spec.drafted, spec.accepted) == (5, 4)
    # The cache holds what plain decoding's does: decoding on gives the same tokens.
    assert spec.decode().tokens[:, 0].tolist() == plain.decode().tokens[:, 0].tolist()
    with pytest.raises(ValueError, match="at most 3"):
        spec.verify({0: [1, 2, 3, 4]})
    with pytest.raises(ValueError, match="not live"):
        spec.verify({1: [1]})
    with pytest.raises(RuntimeError, match="speculation"):
        plain.verify({0: [1]})


def test_served_with_speculation(tiny):
    """Through the HTTP app: the same text as plain decoding, and the draft counters in /metrics."""
    config, params, tok = tiny
    prompt = _requests()[0][0].prompt  # token ids below the tiny vocabulary: no BOS added
    plain = LLM(config, params, tok, max_slots=2, max_seq_len=256).generate(prompt, max_tokens=40, temperature=0)
    llm = LLM(config, params, tok, max_slots=2, max_seq_len=256, speculation=NgramSpeculation(prompt_lookup_min=1))
    with TestClient(create_app(llm, model_name="tiny")) as http:
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0})
        metrics = http.get("/metrics").text
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain.text
    counted = {name: float(re.search(rf"^llama_jax_spec_decode_{name}_tokens_total (\S+)$", metrics, re.M).group(1))
               for name in ("draft", "accepted")}
    assert counted == {"draft": llm.engine.drafted, "accepted": llm.engine.accepted} and counted["accepted"] > 0
