"""Structured output: the constraint's checks, the token masks llguidance computes over our
tokenizers, the sampler honouring them, and whole requests through the scheduler whose output
must match (a random model tries every token the mask lets through)."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.engine import Engine
from llama_jax.sampling import SamplerState, SamplingParams, constrain_rows, sample, unpack_mask
from llama_jax.scheduler import Request, Scheduler
from llama_jax.structured import GrammarCompiler, StructuredOutput
from llama_jax.tokenizer import HFTokenizer, llama3_tokenizer
from test_server import random_params, tiny_config

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "colour", "tags"],
    "additionalProperties": False,
}


def assert_person(text: str) -> bool:
    person = json.loads(text)
    assert list(person) == ["name", "age", "colour", "tags"]  # the schema's order
    assert isinstance(person["name"], str) and len(person["name"]) <= 6
    assert type(person["age"]) is int and 0 <= person["age"] <= 120
    assert person["colour"] in ("red", "green", "blue")
    assert len(person["tags"]) <= 3 and all(type(t) is bool for t in person["tags"])
    return True


@pytest.fixture(scope="module")
def llama3():
    return llama3_tokenizer()


@pytest.fixture(scope="module")
def tiny(llama3):
    """A random two-layer model over the whole Llama 3 vocabulary."""
    config = tiny_config()
    return config, random_params(config, seed=5), llama3


def _scheduler(tiny, decode_steps=4):
    config, params, tok = tiny
    engine = Engine(config, params, max_slots=4, max_seq_len=512, decode_steps=decode_steps, prefill_buckets=(16,))
    return Scheduler(engine, tok)


def _run(sched, requests):
    for r in requests:
        sched.add(r)
    while not all(r.done for r in requests):
        sched.step()
    return requests


# ---- the constraint ----


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"regex": "a", "choice": ("b",)}, "exactly one"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": "[1, 2]"}, "JSON schema"),
    ({"choice": ()}, "non-empty list"),
    ({"choice": ("a", "")}, "non-empty list"),
    ({"regex": ""}, "non-empty string"),
])
def test_a_constraint_takes_exactly_one_valid_form(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutput(**kwargs)


def test_a_schema_keeps_its_key_order_and_the_constraint_stays_hashable():
    so = StructuredOutput(json={"properties": {"b": {}, "a": {}}})
    assert so.json == '{"properties": {"b": {}, "a": {}}}'
    assert hash(so) == hash(StructuredOutput(json=json.loads(so.json)))
    with pytest.raises(ValueError, match="structured_output"):
        SamplingParams(structured_output={"json": {}})


@pytest.mark.parametrize("so, message", [
    (StructuredOutput(json={"type": "nonsense"}), "nonsense"),
    (StructuredOutput(regex="(unclosed"), "invalid structured output"),
    (StructuredOutput(grammar="start: missing_rule"), "missing_rule"),
])
def test_invalid_grammars_are_refused_with_llguidance_s_reason(llama3, so, message):
    with pytest.raises(ValueError, match=message):
        GrammarCompiler(llama3, llama3.vocab_size).matcher(so)


def test_a_tokenizer_larger_than_the_model_is_refused(llama3):
    with pytest.raises(ValueError, match="vocabulary"):
        GrammarCompiler(llama3, 512).matcher(StructuredOutput(regex="a"))


# ---- masks ----


def _allowed(words: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)


def test_unpack_mask_reads_bit_t_mod_32_of_word_t_div_32():
    words = np.random.default_rng(0).integers(-(2**31), 2**31, (3, 5), dtype=np.int64).astype(np.int32)
    got = np.asarray(unpack_mask(jnp.asarray(words), 150))
    np.testing.assert_array_equal(got, np.stack([_allowed(w, 150) for w in words]))


@pytest.fixture(scope="module")
def smol_tokenizer(smol_gguf):
    return HFTokenizer.from_gguf(smol_gguf)


@pytest.mark.parametrize("which", ["llama3", "smol"])
def test_masks_are_exactly_the_tokens_that_keep_the_output_in_the_grammar(which, llama3, smol_tokenizer):
    """For `[0-9]{1,3}`: first every token made of one to three digits, then (after "12") the
    single digits and the end tokens, then (after "123") only the end tokens. Brute force over
    the whole vocabulary, from each token's bytes."""
    tok = llama3 if which == "llama3" else smol_tokenizer
    m = GrammarCompiler(tok, tok.vocab_size).matcher(StructuredOutput(regex="[0-9]{1,3}"))
    normal = [i for i in range(tok.vocab_size) if i not in tok.special_ids]
    digits = {i: tok.token_bytes(i) for i in normal}

    def expect(pattern: str, ends: bool) -> np.ndarray:
        want = np.zeros(tok.vocab_size, bool)
        want[[i for i, b in digits.items() if re.fullmatch(pattern.encode(), b)]] = True
        want[sorted(tok.stop_ids)] = ends
        return want

    np.testing.assert_array_equal(_allowed(m.mask(), tok.vocab_size), expect("[0-9]{1,3}", False))
    for t in tok.encode("12"):
        assert m.advance(t)
    np.testing.assert_array_equal(_allowed(m.mask(), tok.vocab_size), expect("[0-9]", True))
    assert not m.finished
    for t in tok.encode("3"):
        assert m.advance(t)
    assert m.finished
    np.testing.assert_array_equal(_allowed(m.mask(), tok.vocab_size), expect("(?!)", True))
    assert not m.advance(tok.encode("4")[0])


def test_the_sampler_picks_only_allowed_tokens_and_leaves_other_rows_alone():
    b, v = 6, 300
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((b, v)) * 3, jnp.float32)
    allowed = rng.random((b, v)) < 0.05
    allowed[:, 7] = True  # never empty
    words = np.packbits(np.pad(allowed, ((0, 0), (0, 320 - v))), axis=1, bitorder="little").view(np.int32)
    free = dataclasses.replace(SamplerState.empty(b, v), seed=jnp.arange(b, dtype=jnp.uint32),
                               temperature=jnp.asarray([0.0, 1.0, 1.0, 0.0, 1.0, 1.0], jnp.float32))
    rows = jnp.asarray([0, 1, 2, 3])  # rows 4 and 5 stay unconstrained
    masked = constrain_rows(free, rows, jnp.asarray(words[:4]))
    positions = jnp.arange(b, dtype=jnp.int32)
    pick = jax.jit(sample)
    for step in range(20):
        got = np.asarray(pick(logits, masked, positions + step))
        assert all(allowed[r, got[r]] for r in range(4))
        np.testing.assert_array_equal(got[4:], np.asarray(pick(logits, free, positions + step))[4:])
    greedy = np.where(allowed, np.asarray(logits), -np.inf).argmax(-1)
    assert np.asarray(pick(logits, masked, positions))[[0, 3]].tolist() == greedy[[0, 3]].tolist()


# ---- whole requests ----


CONSTRAINTS = [
    (StructuredOutput(json=PERSON), assert_person),
    (StructuredOutput(regex=r"[a-c]{2,4}x"), lambda t: re.fullmatch(r"[a-c]{2,4}x", t)),
    (StructuredOutput(choice=("alpha", "beta", "gamma")), lambda t: t in ("alpha", "beta", "gamma")),
    (StructuredOutput(grammar='start: "(" item ("," item)* ")"\nitem: /[0-9]/'),
     lambda t: re.fullmatch(r"\([0-9](,[0-9])*\)", t)),
]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_random_model_s_output_matches_each_constraint(tiny, temperature):
    """Beside an unconstrained request, which gives the same tokens as alone (it decodes one step
    per dispatch while they run, but its random stream depends only on its seed)."""
    sched = _scheduler(tiny)
    _, _, tok = tiny
    prompt = tok.encode("Fill in the form:")
    plain = SamplingParams(max_tokens=12, temperature=1.0, seed=11)
    reqs = [Request(prompt, SamplingParams(max_tokens=150, temperature=temperature, seed=i, structured_output=so))
            for i, (so, _) in enumerate(CONSTRAINTS[:3])]
    _run(sched, [*reqs, other := Request(prompt, plain)])
    for r, (_, check) in zip(reqs, CONSTRAINTS):
        text = tok.decode(r.output)
        assert check(text), text
        assert not set(r.output) & tok.stop_ids
    (alone,) = _run(_scheduler(tiny), [Request(prompt, plain)])
    assert other.output == alone.output


def test_lark_grammars_and_json_mode_are_followed(tiny):
    _, _, tok = tiny
    so, check = CONSTRAINTS[3]
    reqs = [Request(tok.encode("x"), SamplingParams(max_tokens=60, temperature=1.0, seed=s, structured_output=so))
            for s in range(2)]
    obj = Request(tok.encode("x"), SamplingParams(max_tokens=40, temperature=0.0,
                                                  structured_output=StructuredOutput(json_object=True)))
    _run(_scheduler(tiny), [*reqs, obj])
    for r in reqs:
        assert check(tok.decode(r.output)), tok.decode(r.output)
    text = tok.decode(obj.output)  # greedy on random weights: a long string, cut at max_tokens
    assert re.match(r"\{\s*(\"|\})", text), text


def test_a_request_ends_when_its_grammar_is_complete(tiny):
    """No end token is sampled: a choice ends with its last character."""
    sched = _scheduler(tiny)
    _, _, tok = tiny
    events = []
    (r,) = _run(sched, [Request(tok.encode("x"), SamplingParams.greedy(
        max_tokens=50, structured_output=StructuredOutput(choice=("yes",))), on_event=events.append)])
    assert tok.decode(r.output) == "yes"
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == "yes"


def test_an_invalid_constraint_is_refused_when_queued(tiny):
    sched = _scheduler(tiny)
    with pytest.raises(ValueError, match="invalid structured output"):
        sched.add(Request([1, 2], SamplingParams(structured_output=StructuredOutput(regex="("))))
    assert not sched.has_work()


def test_constrained_decoding_compiles_one_decode_program_per_row_count(tiny):
    sched = _scheduler(tiny)
    # Lowest free slots: both runs decode 2 rows (prefix reuse would keep slot 1's cache and take slot 2).
    sched.prefix_reuse = False
    _, _, tok = tiny
    so = StructuredOutput(regex="[a-z]{8}")
    _run(sched, [Request(tok.encode("a"), SamplingParams(max_tokens=9, temperature=1.0, seed=s, structured_output=so))
                 for s in range(2)])
    before = sched.engine._decode._cache_size(), sched.engine._constrain._cache_size()
    _run(sched, [Request(tok.encode("b"), SamplingParams(max_tokens=9, temperature=1.0, seed=s, structured_output=so))
                 for s in range(2, 4)])
    assert (sched.engine._decode._cache_size(), sched.engine._constrain._cache_size()) == before


def test_without_end_tokens_a_request_ends_with_its_grammar(tiny):
    """llguidance gets an extra end id that no mask reaches: at "12" of `[0-9]{1,3}`, where an end
    token would be allowed, only a third digit is."""
    config, _, tok = tiny
    sched = _scheduler(tiny)
    sched._grammars = GrammarCompiler(tok, config.vocab_size, end_ids=frozenset())
    so = StructuredOutput(regex="[0-9]{1,3}")
    reqs = _run(sched, [Request(tok.encode("n"), SamplingParams(max_tokens=20, temperature=1.0, seed=s,
                                                                  structured_output=so)) for s in range(3)])
    for r in reqs:
        assert re.fullmatch("[0-9]{3}", tok.decode(r.output)), tok.decode(r.output)
