"""Sampling parameters and the per-row sampler that runs inside the jitted decode step.

Every row of a batch carries its own parameters as arrays, so one compiled step serves any mix
of greedy and sampled requests. A row's random stream depends only on its seed and the
position being sampled, so a seeded request gives the same tokens in any batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .structured import StructuredOutput

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit bias: [-100, 100]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature=0` is greedy. Defaults follow Meta's instruct settings."""

    max_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/vLLM style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False  # the stop string that ended the text stays at its end (vLLM's)
    stop_token_ids: tuple[int, ...] = ()  # besides the checkpoint's end-of-turn/text tokens
    ignore_eos: bool = False  # no stop token ends the sequence (stop strings and max_tokens do)
    min_tokens: int = 0  # tokens generated before a stop token may be sampled (vLLM's min_tokens)
    # Special tokens (other than the stop token) are left out of the output text, as vLLM's
    # skip_special_tokens; the token ids keep them. Chat with tools keeps them for the tool parser.
    skip_special_tokens: bool = True
    logprobs: bool = False
    top_logprobs: int = 0
    # Added to the model's logits before penalties and sampling (greedy too), as OpenAI's
    # `logit_bias`: {token id: bias in [-100, 100]}; kept as sorted (id, bias) pairs. Log-probabilities
    # stay those of the model.
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    # Only output that matches this (a JSON schema, a regex, ...; see structured.py) is sampled.
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = self.logit_bias
        try:
            pairs = dict(bias.items() if isinstance(bias, Mapping) else bias)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}") from None
        object.__setattr__(self, "logit_bias", tuple(sorted(pairs.items(), key=lambda kv: kv[0])))
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, field: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{field} {rule}, got {getattr(self, field)!r}")

        check(_is_int(self.max_tokens) and self.max_tokens >= 0, "max_tokens", "must be an integer >= 0")
        check(_finite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 disables it)")
        check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(_finite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        check(_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        check(_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
              f"must be an integer in [0, max_tokens={self.max_tokens}]")
        check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids >= 0")
        check(self.seed is None or _is_int(self.seed), "seed", "must be an integer or None")
        check(isinstance(self.skip_special_tokens, bool), "skip_special_tokens", "must be a bool")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        check(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
              f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        check(all(_is_int(t) and t >= 0 for t, _ in self.logit_bias), "logit_bias", "keys must be token ids >= 0")
        check(all(_finite(b) and abs(b) <= MAX_LOGIT_BIAS for _, b in self.logit_bias), "logit_bias",
              f"values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        check(self.structured_output is None or isinstance(self.structured_output, StructuredOutput),
              "structured_output", "must be a StructuredOutput or None")

    @classmethod
    def greedy(cls, **kw) -> "SamplingParams":
        return cls(temperature=0.0, top_p=1.0, **kw)

    def replace(self, **kw) -> "SamplingParams":
        return dataclasses.replace(self, **kw)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    """Per-row sampling parameters and token statistics, (B,) or (B, V) arrays on device."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seed: jax.Array  # uint32
    output_counts: jax.Array  # (B, V) int32: how often each token was generated
    seen: jax.Array  # (B, V) bool: token appears in the prompt or the output
    logit_bias: jax.Array  # (B, V) float32: added to the logits
    min_left: jax.Array  # int32: tokens to generate before a stop token may be sampled
    stop_mask: jax.Array  # (B, V) bool: the row's stop tokens, banned while min_left > 0
    allowed: jax.Array  # (B, V) bool: tokens the row may sample next (structured output)

    @classmethod
    def empty(cls, batch: int, vocab: int) -> "SamplerState":
        f = lambda v: jnp.full((batch,), v, jnp.float32)  # noqa: E731
        return cls(
            temperature=f(0.0), top_p=f(1.0), top_k=jnp.zeros((batch,), jnp.int32), min_p=f(0.0),
            repetition_penalty=f(1.0), presence_penalty=f(0.0), frequency_penalty=f(0.0),
            seed=jnp.zeros((batch,), jnp.uint32),
            output_counts=jnp.zeros((batch, vocab), jnp.int32), seen=jnp.zeros((batch, vocab), bool),
            logit_bias=jnp.zeros((batch, vocab), jnp.float32),
            min_left=jnp.zeros((batch,), jnp.int32), stop_mask=jnp.zeros((batch, vocab), bool),
            allowed=jnp.ones((batch, vocab), bool),
        )


def row_values(p: SamplingParams, seed: int) -> dict[str, np.ndarray]:
    """The scalar fields of one row of `SamplerState` for request `p`."""
    return dict(
        temperature=np.float32(p.temperature), top_p=np.float32(p.top_p), top_k=np.int32(p.top_k),
        min_p=np.float32(p.min_p), repetition_penalty=np.float32(p.repetition_penalty),
        presence_penalty=np.float32(p.presence_penalty), frequency_penalty=np.float32(p.frequency_penalty),
        seed=np.uint32(seed & 0xFFFFFFFF), min_left=np.int32(p.min_tokens),
    )


def bias_row(p: SamplingParams, vocab: int) -> np.ndarray:
    """The (V,) float32 logit-bias row of request `p`."""
    row = np.zeros((vocab,), np.float32)
    if p.logit_bias:
        ids, biases = zip(*p.logit_bias)
        row[list(ids)] = biases
    return row


def unpack_mask(words: jax.Array, vocab: int) -> jax.Array:
    """(N, ceil(V / 32)) int32 bitmasks (token t: bit t % 32 of word t // 32) as (N, V) bool."""
    ids = jnp.arange(vocab, dtype=jnp.int32)
    return (jnp.right_shift(words[:, ids >> 5], ids & 31) & 1).astype(bool)


def constrain_rows(state: SamplerState, rows: jax.Array, words: jax.Array) -> SamplerState:
    """Set the tokens rows `rows` (N,) may sample next from bitmasks `words` (N, ceil(V / 32))."""
    vocab = state.allowed.shape[1]
    return dataclasses.replace(state, allowed=state.allowed.at[rows].set(unpack_mask(words, vocab), mode="drop"))


def set_rows(
    state: SamplerState, rows: jax.Array, values: dict[str, jax.Array], seen: jax.Array, bias: jax.Array,
    stops: jax.Array, allowed: jax.Array | None = None,
) -> SamplerState:
    """Reset rows `rows` (N,) for new requests: `values` holds (N,) fields, `seen` (N, V) bool marks
    each prompt's tokens, `bias` (N, V) holds their logit biases, `stops` (N, V) bool their stop
    tokens (for min_tokens) and `allowed` (N, ceil(V / 32)) int32 the bitmasks of the tokens
    they may sample first (None: any). Rows past the state's batch are dropped (padding)."""
    vocab = state.allowed.shape[1]
    first = True if allowed is None else unpack_mask(allowed, vocab)
    fields = {k: getattr(state, k).at[rows].set(v, mode="drop") for k, v in values.items()}
    return dataclasses.replace(
        state, **fields,
        output_counts=state.output_counts.at[rows].set(0, mode="drop"),
        seen=state.seen.at[rows].set(seen, mode="drop"),
        logit_bias=state.logit_bias.at[rows].set(bias, mode="drop"),
        stop_mask=state.stop_mask.at[rows].set(stops, mode="drop"),
        allowed=state.allowed.at[rows].set(first, mode="drop"),
    )


def record_rows(state: SamplerState, rows: jax.Array, tokens: jax.Array) -> SamplerState:
    """Count the tokens (N,) just generated for rows `rows` (N,); rows past the batch are dropped."""
    return dataclasses.replace(
        state,
        output_counts=state.output_counts.at[rows, tokens].add(1, mode="drop"),
        seen=state.seen.at[rows, tokens].set(True, mode="drop"),
        min_left=state.min_left.at[rows].add(-1, mode="drop"),
    )


def record(state: SamplerState, tokens: jax.Array) -> SamplerState:
    """Count the tokens (B,) just generated, one per row."""
    return record_rows(state, jnp.arange(tokens.shape[0]), tokens)


def _penalise(logits: jax.Array, s: SamplerState) -> jax.Array:
    # The bias first, as vLLM does: penalties then act on the biased logits.
    banned = (s.stop_mask & (s.min_left > 0)[:, None]) | ~s.allowed
    logits = jnp.where(banned, -jnp.inf, logits + s.logit_bias)
    rep = s.repetition_penalty[:, None]
    logits = jnp.where(s.seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    counts = s.output_counts.astype(jnp.float32)
    return logits - s.frequency_penalty[:, None] * counts - s.presence_penalty[:, None] * (counts > 0)


def _truncate(logits: jax.Array, s: SamplerState) -> jax.Array:
    """Mask tokens outside top-k, the top-p nucleus and the min-p floor (logits already tempered)."""
    vocab = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    in_top_k = rank < jnp.where(s.top_k > 0, s.top_k, vocab)[:, None]
    # top-k first; top-p and min-p then act on the renormalised top-k distribution.
    sorted_logits = jnp.where(in_top_k, jnp.take_along_axis(logits, order, axis=-1), -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass before it is below top_p (the top token always stays); top_p = 1
    # keeps all, even where rounding takes the running sum to 1 early.
    before = jnp.cumsum(probs, axis=-1) - probs
    in_top_p = (before < s.top_p[:, None]) | (s.top_p >= 1)[:, None]
    keep = in_top_k & in_top_p & (probs >= s.min_p[:, None] * probs[:, :1])
    keep_sorted = keep | (rank == 0)
    keep_orig = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep_orig, logits, -jnp.inf)


def sample(logits: jax.Array, s: SamplerState, positions: jax.Array) -> jax.Array:
    """Pick one token per row from float32 logits (B, V); `positions` (B,) seeds the random stream."""
    logits = _penalise(logits, s)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled() -> jax.Array:
        tempered = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
        # The sort behind top-k, top-p and min-p only runs when a sampling row sets one of them.
        cut = jnp.any((s.temperature > 0) & ((s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0)))
        truncated = jax.lax.cond(cut, lambda: _truncate(tempered, s), lambda: tempered)
        keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(s.seed, positions)
        picks = jax.vmap(jax.random.categorical)(keys, truncated).astype(jnp.int32)
        return jnp.where(s.temperature > 0, picks, greedy)

    # Nothing of this runs when every row is greedy.
    return jax.lax.cond(jnp.any(s.temperature > 0), sampled, lambda: greedy)


def token_logprobs(logits: jax.Array, tokens: jax.Array, top: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of the model's distribution: chosen tokens (B,) and the `top` best (B, top)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, top)
    return chosen, top_lp, top_ids.astype(jnp.int32)


def seeds_for(params: Sequence[SamplingParams], fallback: np.random.Generator) -> list[int]:
    """A seed per request: its own, else a fresh random one."""
    return [p.seed if p.seed is not None else int(fallback.integers(0, 2**32)) for p in params]
