"""The scheduler on a tiny random model: long prompts prefilled a chunk per step between decode
dispatches, the prefill token budget, cancelling a prompt half prefilled, priority scheduling and preemption."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.config import LlamaConfig
from llama_jax.engine import Engine, PrefillJob
from llama_jax.model import Llama
from llama_jax.sampling import SamplingParams
from llama_jax.scheduler import Request, Scheduler
from llama_jax.server.metrics import ServerMetrics
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


def _logprobs(req):
    return [lp.logprob for lp in req.logprobs]


def test_a_follow_up_prompt_is_prefilled_after_what_its_slot_holds(tiny):
    """The next turn of a conversation goes back to its slot (not the lowest free one) and only its
    new tokens are prefilled; tokens and log-probabilities equal a fresh prefill of the whole."""
    sched = _scheduler(tiny)
    sp = SamplingParams.greedy(max_tokens=10, logprobs=True)
    other, first = Request(_prompt(12, 20), sp), Request(_prompt(40, 21), sp)
    events = {}
    for r in (other, first):
        r.on_event = lambda e, r=r: events.setdefault(r.id, []).append(e)
    _run(sched, [other, first])
    assert (other.slot, first.slot) == (None, None)
    slot = 1  # `first` ran in slot 1, `other` in slot 0
    follow = first.prompt + first.output + _prompt(20, 22)
    second = Request(follow, sp)
    second.on_event = lambda e: events.setdefault(second.id, []).append(e)
    sched.add(second)
    sched.step()
    assert second.slot == slot and second.cached_tokens >= len(first.prompt) + len(first.output) - 1
    while not second.done:
        sched.step()
    lps = [lp for e in events[second.id] for lp in e.logprobs or []]
    fresh_sched = _scheduler(tiny)
    fresh_sched.prefix_reuse = False
    fresh_events = []
    fresh = Request(follow, sp, on_event=fresh_events.append)
    _run(fresh_sched, [fresh])
    assert fresh.cached_tokens == 0
    assert second.output == fresh.output
    fresh_lps = [lp for e in fresh_events for lp in e.logprobs or []]
    np.testing.assert_allclose([lp.logprob for lp in lps], [lp.logprob for lp in fresh_lps], atol=1e-4)


def test_a_short_shared_prefix_takes_the_lowest_free_slot(tiny):
    sched = _scheduler(tiny)
    a, b = Request(_prompt(12, 30), GREEDY), Request(_prompt(40, 31), GREEDY)
    _run(sched, [a, b])
    short = Request(b.prompt[: Scheduler.MIN_PREFIX_REUSE - 1] + _prompt(8, 32), GREEDY)
    sched.add(short)
    sched.step()
    assert short.slot == 0 and short.cached_tokens == 0
    _run(sched, [])


def test_a_new_conversation_does_not_evict_an_idle_one(tiny):
    """While A's next turn runs in slot 0, a new request takes an empty slot rather than slot 1,
    whose cache holds B's conversation; B's next turn then finds it."""
    sched = _scheduler(tiny)
    a, b = Request(_prompt(40, 50), GREEDY), Request(_prompt(40, 51), GREEDY)
    _run(sched, [a, b])
    a2 = sched.add(Request(a.prompt + a.output + _prompt(5, 52), GREEDY))
    sched.step()
    c = sched.add(Request(_prompt(40, 53), GREEDY))
    sched.step()
    assert (a2.slot, a2.cached_tokens > 0, c.slot, c.cached_tokens) == (0, True, 2, 0)
    b2 = sched.add(Request(b.prompt + b.output + _prompt(5, 54), GREEDY))
    sched.step()
    assert b2.slot == 1 and b2.cached_tokens >= len(b.prompt) + len(b.output) - 1
    _run(sched, [])


def test_the_engine_knows_every_token_its_cache_rows_hold(tiny):
    """Prompt, then each token fed to decode, including those sampled past a request's end
    inside one dispatch; a new prompt in the slot replaces what follows its reused start."""
    config, params, _ = tiny
    engine = Engine(config, params, max_slots=2, max_seq_len=64, decode_steps=4, prefill_buckets=(8, 16))
    prompt = _prompt(10, 40)
    first = int(engine.prefill(1, prompt, GREEDY, 0).tokens[0, 0])
    out = engine.decode().tokens[:, 1].tolist()
    engine.release(1)
    held = prompt + [first] + out[:-1]
    assert engine.cached_prefix(1, held + [7]) == len(held)
    assert engine.cached_prefix(1, held) == len(held) - 1  # one token is always left to prefill
    assert engine.cached_prefix(0, held + [7]) == 0
    fork = prompt[:6] + [(prompt[6] + 1) % 512] + prompt[7:]
    assert engine.cached_prefix(1, fork) == 6
    engine.prefill_next([PrefillJob(1, fork, GREEDY, 0, cached=6)])
    engine.release(1)
    assert engine.cached_prefix(1, held + [7]) == 6 and engine.cached_prefix(1, fork + [1]) == len(fork)
    with pytest.raises(ValueError, match="does not hold"):
        engine.prefill_next([PrefillJob(1, held + [7], GREEDY, 0, cached=8)])


def _run(sched, requests):
    for r in requests:
        sched.add(r)
    while sched.has_work():
        sched.step()
    return requests


def test_a_running_requests_prefix_is_copied_for_a_new_one(tiny):
    """A system prompt that a running request holds is copied into the new request's slot
    instead of prefilled again; both answers are those each gets alone."""
    system = _prompt(40, 60)
    a_prompt, b_prompt = system + _prompt(5, 61), system + _prompt(6, 62)
    sched = _scheduler(tiny)
    a = sched.add(Request(a_prompt, GREEDY))
    while a.slot not in sched.running:  # prefilled in chunks of 16
        sched.step()
    b = sched.add(Request(b_prompt, GREEDY))
    sched.step()
    assert not a.done and b.slot != a.slot and b.cached_tokens == len(system)
    _run(sched, [])
    assert a.output == _alone(tiny, a_prompt) and b.output == _alone(tiny, b_prompt)


def test_priority_policy_admits_lower_priorities_first(tiny):
    """vLLM's priority scheduling: queued requests are admitted by priority (lower first), ties in
    arrival order; the default policy refuses a priority."""
    sched = _scheduler(tiny)
    with pytest.raises(ValueError, match="'priority' scheduling policy"):
        sched.add(Request(_prompt(5, 0), GREEDY, priority=1))
    sched.policy = "priority"
    reqs = [sched.add(Request(_prompt(5, i), GREEDY, priority=p)) for i, p in enumerate([3, 1, 2, 0, 1, -5])]
    assert [r.priority for r in sched.waiting] == [-5, 0, 1, 1, 2, 3]
    sched.step()  # four slots: the four first in priority order
    assert {r.id for r in sched.running.values()} == {reqs[i].id for i in (5, 3, 1, 4)}
    with pytest.raises(ValueError, match="policy must be one of"):
        Scheduler(sched.engine, tiny[2], policy="lifo")


def test_a_higher_priority_preempts_the_last_running_request(tiny):
    """With the priority policy, a request that finds every slot taken preempts the running
    request of the lowest priority (latest arrival on ties); that one is prefilled again later
    (prompt and output) and goes on exactly where it stopped: greedy, seeded sampling with
    penalties, min_tokens and a stop token all give what each gives alone."""
    stop = 7  # favoured by its bias, banned until min_tokens: the answer is exactly 10 tokens
    low = [
        GREEDY,
        SamplingParams(max_tokens=24, temperature=1.0, top_p=1.0, seed=7, presence_penalty=1.5,
                       frequency_penalty=1.0, repetition_penalty=1.3, logprobs=True, top_logprobs=2),
        SamplingParams.greedy(max_tokens=24, stop_token_ids=(stop,), logit_bias={stop: 100.0}, min_tokens=10),
    ]
    sched = _scheduler(tiny)
    sched.policy = "priority"
    streamed: dict[str, list] = {}
    keep = lambda e: streamed.setdefault(e.request_id, []).append(e)  # noqa: E731
    first = sched.add(Request(_prompt(9, 70), GREEDY, on_event=keep, priority=5))
    victims = [sched.add(Request(_prompt(9, 71 + i), sp, on_event=keep, priority=5)) for i, sp in enumerate(low)]
    sched.step()
    sched.step()
    assert all(0 < len(r.output) < 10 for r in victims)
    urgent = [sched.add(Request(_prompt(6, 80 + i), GREEDY, priority=-1)) for i in range(3)]
    sched.step()  # the three latest of priority 5 give their slots; the first keeps its own
    assert {r.id for r in sched.running.values()} == {first.id, *(r.id for r in urgent)}
    assert [r.preemptions for r in victims] == [1, 1, 1] and sched.preemptions == 3
    assert b"llama_jax_num_preemptions_total 3.0" in ServerMetrics(sched, 4).render()
    assert [r.id for r in sched.waiting] == [r.id for r in victims]  # in arrival order
    assert sched.add(Request(_prompt(6, 90), GREEDY, priority=5)) is sched.waiting[-1]  # after them
    while sched.has_work():
        sched.step()
    alone = _scheduler(tiny)
    for req, sp in zip([first, *victims], [GREEDY, *low]):
        ref = alone.add(Request(req.prompt, sp))
        while alone.has_work():
            alone.step()
        assert req.output == ref.output, sp
        events = streamed[req.id]
        assert sum((e.token_ids for e in events), []) == req.output  # each token handed out once
        assert events[-1].finish_reason == ("stop" if sp.min_tokens else "length")
    assert len(victims[2].output) == 10 and victims[2].stop_reason == stop
    lps = [lp for e in streamed[victims[1].id] for lp in e.logprobs]
    assert [lp.token_id for lp in lps] == victims[1].output


def test_a_preempted_request_can_be_cancelled_in_the_queue(tiny):
    sched = _scheduler(tiny)
    sched.policy = "priority"
    events = []
    low = [sched.add(Request(_prompt(5, i), GREEDY, priority=1, on_event=events.append)) for i in range(4)]
    sched.step()
    sched.step()
    sched.add(Request(_prompt(5, 9), GREEDY))
    sched.step()
    assert low[3] in sched.waiting and low[3].output
    sched.cancel(low[3])
    sched.step()
    assert low[3].done and low[3] not in sched.waiting
    assert [e.finish_reason for e in events if e.request_id == low[3].id][-1] == "cancelled"
    sched.policy = "fcfs"  # never preempts
    late = sched.add(Request(_prompt(5, 10), GREEDY))
    sched.step()
    assert sched.preemptions == 1 and late in sched.waiting
