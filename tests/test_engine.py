"""The engine on a tiny random model: cached decode, batching, chunked prefill, compile counts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.config import LlamaConfig
from llama_jax.engine import Engine, PrefillJob
from llama_jax.model import KVCache, Llama, forward, unstack_layers
from llama_jax.quantization import quantize_weight
from llama_jax.sampling import SamplingParams

GREEDY = SamplingParams.greedy()


@pytest.fixture(scope="module")
def tiny():
    config = LlamaConfig.from_preset("tiny")
    return config, Llama(config, rngs=nnx.Rngs(0), dtype=jnp.float32).params()


def _engine(tiny, **kw):
    config, params = tiny
    kw = {"max_slots": 4, "max_seq_len": 256, "decode_steps": 4, "prefill_buckets": (8, 16), **kw}
    return Engine(config, params, **kw)


def _run(engine, prompts, n, sampling=GREEDY, seeds=None, slots=None):
    slots = slots or list(range(len(prompts)))
    out = {}
    for i, (slot, prompt) in enumerate(zip(slots, prompts)):
        seed = seeds[i] if seeds else 0
        out[slot] = [int(engine.prefill(slot, prompt, sampling, seed).tokens[0, 0])]
    while min(len(v) for v in out.values()) < n:
        step = engine.decode()
        for slot in out:
            out[slot] += step.tokens[:, slot].tolist()
    for slot in out:
        engine.release(slot)
    return [out[s][:n] for s in slots]


def _recompute_greedy(tiny, prompt, n):
    """Greedy tokens from a fresh full forward per token (no cache reuse). The sequence is padded
    to one fixed length so this compiles once: causal attention keeps the padding out of view."""
    config, params = tiny
    total = len(prompt) + n
    step = jax.jit(lambda p, tok: forward(p, config, tok, jnp.arange(total)[None],
                                         KVCache.zeros(config, 1, total, jnp.float32))[0])
    tokens = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, total), np.int32)
        padded[0, : len(tokens)] = tokens
        logits = step(params, jnp.asarray(padded))
        tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
    return tokens[len(prompt):]


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def test_engine_equals_full_recompute(tiny):
    """Bucketed, chunked prefill (21 > largest bucket 16) and cached decode equal a fresh forward per token."""
    prompts = _prompts(tiny[0].vocab_size, [3, 21, 9])
    got = _run(_engine(tiny), prompts, 10)
    for prompt, tokens in zip(prompts, got):
        assert tokens == _recompute_greedy(tiny, prompt, 10)


def test_batched_equals_alone(tiny):
    prompts = _prompts(tiny[0].vocab_size, [5, 12, 7, 30], seed=1)
    engine = _engine(tiny)
    together = _run(engine, prompts, 12)
    alone = [_run(engine, [p], 12, slots=[2])[0] for p in prompts]
    assert together == alone


def test_seeded_sampling_does_not_depend_on_the_batch(tiny):
    sampling = SamplingParams(temperature=1.0, top_p=0.95, top_k=50)
    prompts = _prompts(tiny[0].vocab_size, [6, 11, 4], seed=2)
    engine = _engine(tiny)
    together = _run(engine, prompts, 9, sampling, seeds=[11, 22, 33])
    alone = _run(engine, [prompts[1]], 9, sampling, seeds=[22], slots=[3])[0]
    assert together[1] == alone
    again = _run(engine, [prompts[1]], 9, sampling, seeds=[23], slots=[0])[0]
    assert again != alone  # another seed, another stream


def test_no_recompile_in_steady_state(tiny):
    engine = _engine(tiny)
    prompts = _prompts(tiny[0].vocab_size, [5, 12, 6, 7, 13, 14], seed=3)
    _run(engine, prompts[:2], 8)  # compiles both prefill buckets (8, 16) and decode of 2 rows
    _run(engine, prompts[:1], 8)  # and decode of 1 row
    prefill_programs, decode_programs = engine._prefill._cache_size(), engine._decode._cache_size()
    for p in prompts[2:]:  # new lengths inside the same bucket and window
        _run(engine, [p], 8)
    assert engine._prefill._cache_size() == prefill_programs
    assert engine._decode._cache_size() == decode_programs


def test_windows_grow_past_the_first_bucket(tiny):
    """A sequence crossing the 128-slot window keeps matching the full recompute."""
    prompt = _prompts(tiny[0].vocab_size, [120], seed=4)[0]
    got = _run(_engine(tiny, decode_steps=8), [prompt], 24)[0]
    assert got == _recompute_greedy(tiny, prompt, 24)


@pytest.mark.parametrize("cache_dtype", [None, jnp.int8])
def test_block_decode_equals_the_dense_window(tiny, cache_dtype):
    """One long sequence among short ones: decode reads each row's own blocks, and the tokens
    equal those of the dense window and of each sequence alone."""
    prompts = _prompts(tiny[0].vocab_size, [230, 5, 9, 3], seed=7)
    engine = _engine(tiny, cache_dtype=cache_dtype, prefill_buckets=(8, 64))
    used = []
    choose = engine._decode_blocks
    engine._decode_blocks = lambda *a: used.append(choose(*a)) or used[-1]
    together = _run(engine, prompts, 16)
    assert all(b is not None for b in used)
    assert [int(b[0].shape[0]) for b in used[:1]] == [8]  # 2 + 1 + 1 + 1 blocks, padded to 8
    dense = _engine(tiny, cache_dtype=cache_dtype, prefill_buckets=(8, 64))
    dense._blocks_ok = False
    assert _run(dense, prompts, 16) == together
    assert [_run(engine, [p], 16, slots=[3])[0] for p in prompts] == together


def _decode_with_logprobs(engine, prompts, steps):
    """Prefill prompts into slots 0, 1, ... and decode `steps` calls: tokens and chosen-token logprobs."""
    for slot, prompt in enumerate(prompts):
        engine.prefill(slot, prompt, GREEDY, 0)
    outs = [engine.decode(want_logprobs=True) for _ in range(steps)]
    for slot in range(len(prompts)):
        engine.release(slot)
    return np.concatenate([o.tokens for o in outs]), np.concatenate([o.logprobs for o in outs])


@pytest.mark.parametrize("preset, cache_dtype, blocks", [  # untied and tied LM heads
    ("tiny", None, True), ("tiny", jnp.int8, False), ("tiny-mha-tied", None, False), ("tiny-mha-tied", jnp.int8, True),
])
def test_feature_major_decode_equals_stored_weights(preset, cache_dtype, blocks):
    """Decode with (out, in) weight copies and the residual stream as columns gives the tokens
    and log-probabilities of the stored-layout decode: over KV blocks and over the dense
    window, with a float and an int8 cache, with all slots and with fewer rows than slots."""
    config = LlamaConfig.from_preset(preset)
    params = Llama(config, rngs=nnx.Rngs(1), dtype=jnp.float32).params()
    params = {**params, "layers": unstack_layers(params["layers"], config.n_layers)}
    engines = {}
    for fm in (False, True):
        e = Engine(config, params, max_slots=4, max_seq_len=256, decode_steps=4, prefill_buckets=(8, 64),
                   cache_dtype=cache_dtype, feature_major_decode=fm)
        e._blocks_ok &= blocks
        engines[fm] = e
    assert engines[True].feature_major_decode
    for lengths in ([130, 5, 9, 3], [7]):  # all four rows; one row of four slots
        prompts = _prompts(config.vocab_size, lengths, seed=8)
        (t0, lp0), (t1, lp1) = (_decode_with_logprobs(engines[fm], prompts, 3) for fm in (False, True))
        np.testing.assert_array_equal(t1, t0)
        # An int8 cache can round a key one step differently when the products differ in the last bit.
        tol = 1e-5 if cache_dtype is None else 5e-4
        np.testing.assert_allclose(lp1, lp0, rtol=tol, atol=tol)


def test_feature_major_decode_is_the_cpu_default_for_plain_unstacked_weights(tiny):
    config, params = tiny
    unstacked = {**params, "layers": unstack_layers(params["layers"], config.n_layers)}
    assert Engine(config, unstacked, max_slots=2, max_seq_len=64).feature_major_decode
    assert not Engine(config, params, max_slots=2, max_seq_len=64).feature_major_decode  # stacked (scan)
    layer = unstacked["layers"][0]
    quantized = {**unstacked, "layers": ({**layer, "wq": quantize_weight(layer["wq"], "wq", "int8", stacked=False)},
                                         *unstacked["layers"][1:])}
    assert not Engine(config, quantized, max_slots=2, max_seq_len=64).feature_major_decode  # an object, not an array
    got = _run(Engine(config, unstacked, max_slots=4, max_seq_len=256, decode_steps=4, prefill_buckets=(8, 16)),
               _prompts(config.vocab_size, [3, 21, 9]), 10)
    assert got == _run(_engine(tiny), _prompts(config.vocab_size, [3, 21, 9]), 10)
    with pytest.raises(ValueError, match="one weight tree per layer"):
        Engine(config, params, max_slots=2, max_seq_len=64, feature_major_decode=True)
    with pytest.raises(ValueError, match="attention_impl='xla'"):
        Engine(config, unstacked, max_slots=2, max_seq_len=64, feature_major_decode=True, attention_impl="pallas")


def test_feature_major_decode_compiles_every_weight_product_as_weight_times_columns(tiny):
    """The speed of feature-major decode rests on XLA keeping each weight product as W (out, in)
    times activations (in, B); XLA folds a transpose next to a dot into it unless kept apart."""
    config, params = tiny
    unstacked = {**params, "layers": unstack_layers(params["layers"], config.n_layers)}
    engine = Engine(config, unstacked, max_slots=4, max_seq_len=256, decode_steps=2, prefill_buckets=(8,))
    for slot in range(4):
        engine.prefill(slot, _prompts(config.vocab_size, [5], seed=slot)[0], GREEDY, 0)
    hlo = engine.lower_decode().compile().as_text()
    products = [line for line in hlo.splitlines() if " dot(" in line and "batch_dims" not in line]
    assert len(products) == 7 * config.n_layers + 1  # q, k, v, o, gate, up, down; the LM head
    for line in products:
        assert re.search(r"= f32\[\d+,4\]\{1,0\} dot\(", line), line
        assert "lhs_contracting_dims={1}, rhs_contracting_dims={0}" in line, line


def test_prefill_validates(tiny):
    engine = _engine(tiny)
    with pytest.raises(ValueError, match="prompt length"):
        engine.prefill(0, [], GREEDY, 0)
    with pytest.raises(ValueError, match="prompt length"):
        engine.prefill(0, [1] * 256, GREEDY, 0)
    engine.prefill(0, [1, 2], GREEDY, 0)
    with pytest.raises(RuntimeError, match="busy"):
        engine.prefill(0, [1, 2], GREEDY, 0)


def _prefill_and_decode(engine, jobs, running=()):
    """Prefill `jobs` together, decode 6 steps; tokens of the jobs' slots and of the `running`
    slots (prefilled before), and the prefill output. Releases every slot."""
    out = engine.prefill_many(jobs) if jobs else None
    step = engine.decode(steps=6)
    tokens = {j.slot: [int(out.tokens[0, c])] + step.tokens[:, j.slot].tolist() for c, j in enumerate(jobs)}
    tokens.update({slot: step.tokens[:, slot].tolist() for slot in running})
    for slot in [j.slot for j in jobs] + list(running):
        engine.release(slot)
    return tokens, out


def test_prefill_many_equals_one_at_a_time(tiny):
    """Prompts admitted together (bucket 8: three rows padded to four, one of them the tail of a
    prompt chunked past the largest bucket; bucket 16: one row) give the tokens and
    log-probabilities of prompts prefilled alone, greedy and seeded sampling with penalties mixed,
    and leave a sequence already running in the last slot (the one padding rows read) undisturbed."""
    prompts = _prompts(tiny[0].vocab_size, [5, 7, 37, 12, 9], seed=5)
    samplings = [
        SamplingParams.greedy(logprobs=True, top_logprobs=3),
        SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.3, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=1.2, top_k=20, presence_penalty=0.5, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=0.7, min_p=0.05),
    ]
    jobs = [PrefillJob(slot, p, sp, 100 + slot) for slot, (p, sp) in enumerate(zip(prompts, samplings))]
    engine = _engine(tiny, max_slots=6)
    last = 5
    running = SamplingParams(temperature=1.0, frequency_penalty=0.7)
    engine.prefill(last, prompts[4], running, 7)
    together, out = _prefill_and_decode(engine, jobs, running=[last])
    assert out.tokens.shape == (1, 4) and out.top_ids.shape == (1, 4, 20)
    engine.prefill(last, prompts[4], running, 7)
    assert together[last] == _prefill_and_decode(engine, [], running=[last])[0][last]
    for c, job in enumerate(jobs):
        alone, one = _prefill_and_decode(engine, [PrefillJob(4, job.prompt, job.sampling, job.seed)])
        assert together[job.slot] == alone[4]
        if not job.sampling.logprobs:
            continue
        np.testing.assert_allclose(out.logprobs[0, c], one.logprobs[0, 0], rtol=1e-5, atol=1e-6)
        assert out.top_ids[0, c].tolist() == one.top_ids[0, 0].tolist()


def test_prefill_many_validates(tiny):
    engine = _engine(tiny)
    with pytest.raises(ValueError, match="no prompts"):
        engine.prefill_many([])
    with pytest.raises(ValueError, match="two prompts for one slot"):
        engine.prefill_many([PrefillJob(1, [1], GREEDY, 0), PrefillJob(1, [2], GREEDY, 0)])
    with pytest.raises(ValueError, match="outside"):
        engine.prefill_many([PrefillJob(0, [1], GREEDY, 0), PrefillJob(4, [1], GREEDY, 0)])
    assert engine.free_slots() == [0, 1, 2, 3]  # nothing was written


def test_decode_computes_only_the_rows_holding_live_slots(tiny):
    """A sequence decodes the same in slot 0 of 8 (one row computed) as in slot 5 (all 8 rows),
    greedy and seeded sampling; rows grow to the next power of two holding the highest live slot."""
    engine = _engine(tiny, max_slots=8)
    prompt = _prompts(tiny[0].vocab_size, [11], seed=6)[0]
    sampled = SamplingParams(temperature=1.0, top_k=40, repetition_penalty=1.2)
    for sampling in (GREEDY, sampled):
        first = _run(engine, [prompt], 12, sampling, seeds=[5], slots=[0])[0]
        assert _run(engine, [prompt], 12, sampling, seeds=[5], slots=[5])[0] == first
    assert engine.decode_rows() == 8  # nothing live
    engine.prefill(2, prompt, GREEDY, 0)
    assert engine.decode_rows() == 4
    assert engine.decode().tokens.shape == (4, 4)
    engine.prefill(0, prompt, GREEDY, 0)
    engine.release(2)
    assert engine.decode_rows() == 1


@pytest.mark.parametrize("cache_dtype", [None, jnp.int8])
def test_a_copied_prefix_continues_like_a_whole_prefill(tiny, cache_dtype):
    """The start of a live slot's rows copied into a free slot, then the rest of a prompt
    prefilled there: the tokens of prefilling the whole prompt (int8: the scales travel too)."""
    config, _ = tiny
    shared, rest_a, rest_b = _prompts(config.vocab_size, [20, 3, 5], seed=4)
    expected = _run(_engine(tiny, cache_dtype=cache_dtype), [shared + rest_b], 8)[0]
    engine = _engine(tiny, cache_dtype=cache_dtype)
    engine.prefill(2, shared + rest_a, GREEDY, 0)
    engine.decode()  # the source is live and has moved on
    engine.copy_prefix(2, 0, len(shared))
    assert engine.cached_prefix(0, shared + rest_b) == len(shared)
    out = engine.prefill_many([PrefillJob(0, shared + rest_b, GREEDY, 0, cached=len(shared))]).tokens[0].tolist()
    while len(out) < 8:
        out += engine.decode().tokens[:, 0].tolist()
    assert out[:8] == expected
    with pytest.raises(ValueError, match="free destination"):
        engine.copy_prefix(2, 0, 4)
    engine.release(0)
    with pytest.raises(ValueError, match="cannot copy"):
        engine.copy_prefix(2, 0, 10_000)
