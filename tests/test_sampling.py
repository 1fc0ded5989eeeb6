import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.sampling import (
    SamplerState, SamplingParams, _penalise, _truncate, bias_row, row_values, sample, set_rows, token_logprobs,
)


def _state(batch, vocab, **fields):
    s = SamplerState.empty(batch, vocab)
    for k, v in fields.items():
        setattr(s, k, jnp.asarray(v, getattr(s, k).dtype))
    return s


def _reference_keep(logits, top_k, top_p, min_p):
    """The kept token set of one row: top-k, then top-p and min-p on the renormalised top-k."""
    order = np.argsort(-logits, kind="stable")
    k = top_k if top_k > 0 else len(logits)
    kept = order[:k]
    p = np.exp(logits[kept] - logits[kept].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    ok = (before < top_p) & (p >= min_p * p[0])
    ok[0] = True
    return set(kept[ok].tolist())


def test_truncation_matches_reference():
    rng = np.random.default_rng(0)
    b, v = 16, 50
    logits = rng.standard_normal((b, v)).astype(np.float32) * 3
    top_k = rng.integers(0, 10, b)
    top_p = rng.uniform(0.05, 1.0, b).astype(np.float32)
    min_p = np.where(rng.random(b) < 0.5, 0, rng.uniform(0, 0.3, b)).astype(np.float32)
    s = _state(b, v, top_k=top_k, top_p=top_p, min_p=min_p)
    out = np.asarray(_truncate(jnp.asarray(logits), s))
    for i in range(b):
        got = set(np.nonzero(np.isfinite(out[i]))[0].tolist())
        assert got == _reference_keep(logits[i], top_k[i], top_p[i], min_p[i]), i


def test_penalties_match_reference():
    rng = np.random.default_rng(1)
    b, v = 4, 30
    logits = rng.standard_normal((b, v)).astype(np.float32)
    counts = rng.integers(0, 3, (b, v)) * (rng.random((b, v)) < 0.3)
    prompt_seen = rng.random((b, v)) < 0.2
    seen = prompt_seen | (counts > 0)
    rep, pres, freq = np.array([1.0, 1.3, 0.8, 2.0]), np.array([0, 0.5, -0.5, 1.5]), np.array([0, 0.2, 1.0, -1.0])
    bias = rng.uniform(-3, 3, (b, v)).astype(np.float32) * (rng.random((b, v)) < 0.3)
    stops, min_left = rng.random((b, v)) < 0.1, np.array([0, 3, 1, -2])  # rows 1 and 2 still ban their stops
    s = _state(b, v, repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq,
               output_counts=counts, seen=seen, logit_bias=bias, stop_mask=stops, min_left=min_left)
    got = np.asarray(_penalise(jnp.asarray(logits), s))
    want = logits + bias  # the bias comes first, as in vLLM
    want[stops & (min_left > 0)[:, None]] = -np.inf
    for i in range(b):
        for t in range(v):
            if seen[i, t]:  # HF RepetitionPenaltyLogitsProcessor
                want[i, t] = want[i, t] / rep[i] if want[i, t] > 0 else want[i, t] * rep[i]
            want[i, t] -= freq[i] * counts[i, t] + pres[i] * (counts[i, t] > 0)  # OpenAI
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_greedy_rows_take_the_argmax_and_sampled_rows_follow_the_distribution():
    v, n = 6, 4000
    logits = np.array([1.0, 2.0, 0.5, -1.0, 1.5, 0.0], np.float32)
    temps = np.array([0.0] + [0.7] * (n - 1), np.float32)
    s = _state(n, v, temperature=temps, seed=np.arange(n, dtype=np.uint32))
    tokens = np.asarray(sample(jnp.tile(jnp.asarray(logits), (n, 1)), s, jnp.zeros((n,), jnp.int32)))
    assert tokens[0] == 1
    freq = np.bincount(tokens[1:], minlength=v) / (n - 1)
    want = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    np.testing.assert_allclose(freq, want, atol=0.03)


def test_sampling_is_reproducible_per_seed_and_position():
    v = 100
    logits = jnp.asarray(np.random.default_rng(2).standard_normal((3, v)), jnp.float32)
    s = _state(3, v, temperature=[1.0, 1.0, 1.0], seed=[7, 7, 8])
    a = np.asarray(sample(logits, s, jnp.array([5, 5, 5])))
    b = np.asarray(sample(logits, s, jnp.array([5, 5, 5])))
    np.testing.assert_array_equal(a, b)
    draws = np.stack([np.asarray(sample(logits, s, jnp.array([p, p, p]))) for p in range(20)])
    assert len({tuple(col) for col in draws.T}) > 1  # different seeds differ somewhere
    assert len(set(draws[:, 0].tolist())) > 1  # positions advance the stream


def test_logprobs_are_the_model_distribution():
    logits = jnp.asarray(np.random.default_rng(3).standard_normal((2, 40)) * 2, jnp.float32)
    tokens = jnp.array([3, 17])
    chosen, top_lp, top_ids = token_logprobs(logits, tokens, 5)
    ref = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(chosen, ref[jnp.arange(2), tokens], rtol=1e-6)
    np.testing.assert_array_equal(top_ids, np.argsort(-np.asarray(ref), axis=-1)[:, :5])


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", -1), ("top_k", -2),
     ("min_p", 2.0), ("presence_penalty", 3.0), ("top_logprobs", 21), ("temperature", float("nan")),
     ("logit_bias", {5: 101.0}), ("logit_bias", {-1: 1.0}), ("logit_bias", {5: float("inf")}),
     ("logit_bias", {"5": 1.0}), ("logit_bias", [1, 2]), ("min_tokens", 257), ("min_tokens", -1),
     ("stop_token_ids", (-3,))],
)
def test_invalid_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_defaults_are_metas_and_rows_carry_them():
    p = SamplingParams()
    assert (p.temperature, p.top_p) == (0.6, 0.9)
    values = row_values(p, seed=2**40 + 5)
    assert values["seed"] == 5 and values["temperature"] == np.float32(0.6)
    assert SamplingParams(stop="###").stop == ("###",)


def test_logit_bias_rows_steer_greedy_and_sampled_tokens():
    p = SamplingParams(logit_bias={7: 100, 2: -100.0, 3: 2.5})
    assert p.logit_bias == ((2, -100.0), (3, 2.5), (7, 100))
    assert SamplingParams(logit_bias=[(3, 1.0)]).logit_bias == ((3, 1.0),)
    row = bias_row(p, 10)
    np.testing.assert_array_equal(row, [0, 0, -100, 2.5, 0, 0, 0, 100, 0, 0])

    v, n = 10, 400
    logits = jnp.asarray(np.random.default_rng(4).standard_normal((n, v)) * 2, jnp.float32)
    s = set_rows(_state(n, v), jnp.arange(n), {"temperature": jnp.full((n,), 1.0).at[0].set(0.0),
                                               "seed": jnp.arange(n, dtype=jnp.uint32)},
                 jnp.zeros((n, v), bool), jnp.tile(jnp.asarray(row), (n, 1)), jnp.zeros((n, v), bool))
    tokens = np.asarray(sample(logits, s, jnp.zeros((n,), jnp.int32)))
    assert (tokens == 7).all()  # +100 dominates greedy and sampled rows alike
    forbid = SamplingParams(logit_bias={int(t): -100 for t in np.argsort(-np.asarray(logits[0]))[:3]})
    s = set_rows(_state(1, v), jnp.arange(1), {}, jnp.zeros((1, v), bool), jnp.asarray(bias_row(forbid, v))[None],
                 jnp.zeros((1, v), bool))
    greedy = int(sample(logits[:1], s, jnp.zeros((1,), jnp.int32))[0])
    assert greedy == int(np.argsort(-np.asarray(logits[0]))[3])  # the best token not pushed down
