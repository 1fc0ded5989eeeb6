"""The scheduler on a tiny random model: long prompts prefilled a chunk per step between decode
dispatches, the prefill token budget, cancelling a prompt half prefilled."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.config import LlamaConfig
from llama_jax.engine import Engine
from llama_jax.model import Llama
from llama_jax.sampling import SamplingParams
from llama_jax.scheduler import Request, Scheduler
from llama_jax.tokenizer import llama3_tokenizer

GREEDY = SamplingParams.greedy(max_tokens=24)


@pytest.fixture(scope="module")
def tiny():
    config = LlamaConfig.from_preset("tiny")  # 512 ids: plain byte-level tokens of the Llama 3 tokenizer
    return config, Llama(config, rngs=nnx.Rngs(1), dtype=jnp.float32).params(), llama3_tokenizer()


def _scheduler(tiny, budget=None):
    config, params, tok = tiny
    engine = Engine(config, params, max_slots=4, max_seq_len=256, decode_steps=4, prefill_buckets=(8, 16))
    return Scheduler(engine, tok, prefill_budget=budget)


def _prompt(n, seed):
    return np.random.default_rng(seed).integers(0, 512, n).tolist()


def _alone(tiny, prompt):
    sched = _scheduler(tiny)
    req = sched.add(Request(prompt, GREEDY))
    while not req.done:
        sched.step()
    return req.output


def test_a_long_prompt_is_prefilled_between_decode_steps(tiny):
    sched = _scheduler(tiny)
    short, long = _prompt(5, 0), _prompt(60, 1)  # 60 tokens: chunks of 16, 16, 16, then 12
    first = sched.add(Request(short, GREEDY))
    sched.step()
    second = sched.add(Request(long, GREEDY))
    steps_filling = 0
    while not second.output:
        before = len(first.output)
        sched.step()
        assert len(first.output) > before  # the running stream moves in every step
        if not second.output:
            steps_filling += 1
            assert second.slot in sched.filling and second.slot not in sched.engine.free_slots()
    assert steps_filling == 3
    while not (first.done and second.done):
        sched.step()
    assert first.output == _alone(tiny, short)
    assert second.output == _alone(tiny, long)


def test_new_requests_skip_one_decode_but_never_two_in_a_row(tiny):
    sched = _scheduler(tiny)
    a = sched.add(Request(_prompt(5, 6), GREEDY))
    sched.step()  # prefill only: a request arriving now joins before the first decode
    assert len(a.output) == 1
    b = sched.add(Request(_prompt(7, 7), GREEDY))
    sched.step()  # b's prefill, then a decode: the step before skipped one
    assert (len(a.output), len(b.output)) == (5, 5)
    c = sched.add(Request(_prompt(9, 8), GREEDY))
    sched.step()
    assert (len(a.output), len(b.output), len(c.output)) == (5, 5, 1)
    sched.step()  # nothing new: decode
    assert (len(a.output), len(b.output), len(c.output)) == (9, 9, 5)


def test_min_tokens_hold_back_stop_tokens(tiny):
    sched = _scheduler(tiny)
    prompt = _prompt(6, 9)
    plain = _alone(tiny, prompt)
    stop = plain[2]
    stopped = sched.add(Request(prompt, GREEDY.replace(stop_token_ids=(stop,))))
    held = sched.add(Request(prompt, GREEDY.replace(stop_token_ids=(stop,), min_tokens=8)))
    while sched.has_work():
        sched.step()
    first = plain.index(stop)
    assert stopped.output == plain[:first]
    assert held.output[:first] == plain[:first] and stop not in held.output[:8] and len(held.output) >= 8


def test_prompts_past_the_vocabulary_are_refused_at_the_queue(tiny):
    """Also prompts rendered by a chat format whose tokenizer does not match the model."""
    sched = _scheduler(tiny)
    with pytest.raises(ValueError, match=r"token id 512 is outside the vocabulary \[0, 512\)"):
        sched.add(Request([1, 512, 3], GREEDY))
    with pytest.raises(ValueError, match="vocabulary"):
        sched.add(Request([1, -1], GREEDY))
    with pytest.raises(ValueError, match="logit_bias"):
        sched.add(Request([1, 2], GREEDY.replace(logit_bias={600: 1.0})))
    assert not sched.has_work()


def test_the_budget_bounds_the_prompt_tokens_of_a_step(tiny):
    sched = _scheduler(tiny, budget=16)
    reqs = [sched.add(Request(_prompt(10, 2 + i), GREEDY)) for i in range(3)]
    sched.step()  # 10 + 10 tokens reach the budget: the third waits
    assert [r.slot is not None for r in reqs] == [True, True, False] and len(sched.waiting) == 1
    sched.step()
    assert reqs[2].slot is not None
    with pytest.raises(ValueError, match="prefill_budget"):
        _scheduler(tiny, budget=0)


def test_cancelling_a_prompt_half_prefilled_frees_its_slot(tiny):
    sched = _scheduler(tiny)
    req = sched.add(Request(_prompt(40, 5), GREEDY))
    events = sched.step()
    assert events == [] and req.slot in sched.filling
    sched.cancel(req)
    (event,) = sched.step()
    assert event.finish_reason == "cancelled" and not sched.has_work()
    assert sched.engine.free_slots() == [0, 1, 2, 3] and not sched.engine.filling
    again = sched.add(Request(_prompt(40, 5), GREEDY))  # the slot's half-written cache is no obstacle
    while not again.done:
        sched.step()
    assert again.output == _alone(tiny, _prompt(40, 5))
