"""The inference engine: fixed decode slots over one KV cache, with jitted, bucketed steps.

- Prefill runs one prompt into one slot, padded to a length bucket (chunked past the largest
  bucket), so a new prompt length never compiles a new program.
- Decode advances every slot by `decode_steps` tokens in one dispatch (a scan inside jit).
- Attention reads only the first `kv_window` cache slots, a power-of-two bucket that covers the
  longest live sequence, so short sequences do not pay for the full context.
- The cache and sampler state are donated to every step and updated in place.

The engine knows nothing of text or requests: `scheduler.py` drives it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .attention import AttentionImpl
from .config import LlamaConfig
from .model import KVCache, Params, forward
from .sampling import MAX_TOP_LOGPROBS, SamplerState, SamplingParams, record, row_values, sample, set_row, token_logprobs

DEFAULT_PREFILL_BUCKETS = (32, 64, 128, 256, 512, 1024)
MIN_KV_WINDOW = 128


@dataclasses.dataclass
class StepOutput:
    """Tokens of one engine call, host-side. Shapes: (steps, slots) for decode, (1, 1) for prefill."""

    tokens: np.ndarray
    logprobs: np.ndarray | None = None  # chosen-token log-probabilities
    top_logprobs: np.ndarray | None = None  # (..., MAX_TOP_LOGPROBS)
    top_ids: np.ndarray | None = None


class Engine:
    def __init__(
        self,
        config: LlamaConfig,
        params: Params,
        *,
        max_slots: int = 8,
        max_seq_len: int | None = None,
        cache_dtype: Any = None,
        prefill_buckets: tuple[int, ...] = DEFAULT_PREFILL_BUCKETS,
        decode_steps: int = 8,
        attention_impl: AttentionImpl = "xla",
        shardings: Any = None,
    ):
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
        self.config = config
        self.params = params
        self.max_slots = max_slots
        self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)
        self.prefill_buckets = tuple(sorted(b for b in prefill_buckets if b <= self.max_seq_len)) or (self.max_seq_len,)
        self.decode_steps = decode_steps
        self.attention_impl = attention_impl
        dtype = cache_dtype or params["embed"].dtype
        # An inactive slot sits at a position past the cache: its writes are dropped.
        self._parked = self.max_seq_len + 1

        def state() -> tuple[KVCache, SamplerState, jax.Array, jax.Array]:
            return (
                KVCache.zeros(config, max_slots, self.max_seq_len, dtype),
                SamplerState.empty(max_slots, config.vocab_size),
                jnp.zeros((max_slots,), jnp.int32),
                jnp.full((max_slots,), self._parked, jnp.int32),
            )

        # With a mesh, every step declares its shardings (llama_jax/sharding.py): slots split over
        # dp, the cache as the table says, tokens handed to the host replicated. Outputs carry the
        # same shardings as inputs, so steady state never reshards or recompiles.
        prefill_sh: dict[str, Any] = {}
        decode_sh: dict[str, Any] = {}
        release_sh: dict[str, Any] = {}
        if shardings is None:
            self.cache, self.sampler, self.tokens, self.positions = state()
        else:
            if max_slots % shardings.dp:
                raise ValueError(f"max_slots ({max_slots}) must be a multiple of the mesh's dp size ({shardings.dp})")
            self.params = params = jax.device_put(params, shardings.params)
            rep, rows = shardings.replicated, shardings.batch()
            # Per-slot values split over dp; (slots, vocab) statistics also over the vocabulary, like the logits.
            sampler_sh = jax.tree.map(
                lambda a: shardings.sharding(("batch", "vocab")[: a.ndim], a.shape),
                jax.eval_shape(lambda: SamplerState.empty(max_slots, config.vocab_size)),
            )
            cache_sh = shardings.cache_for(dtype)
            state_sh = (cache_sh, sampler_sh, rows, rows)
            # Built in place on the devices: the full cache never sits on one device.
            self.cache, self.sampler, self.tokens, self.positions = jax.jit(state, out_shardings=state_sh)()
            prefill_sh = dict(
                in_shardings=(shardings.params, cache_sh, sampler_sh) + (rep,) * 6,
                out_shardings=(cache_sh, sampler_sh, rep),
            )
            decode_sh = dict(in_shardings=(shardings.params,) + state_sh, out_shardings=state_sh + (rep,))
            release_sh = dict(in_shardings=(rows, sampler_sh, rep), out_shardings=(rows, sampler_sh))
        # Host mirror: position of each slot's last token, or None when the slot is free.
        self.slot_pos: list[int | None] = [None] * max_slots
        self._prefill = jax.jit(self._prefill_fn, static_argnums=(9, 10), donate_argnums=(1, 2), **prefill_sh)
        self._decode = jax.jit(self._decode_fn, static_argnums=(5, 6, 7), donate_argnums=(1, 2, 3, 4), **decode_sh)
        self._release = jax.jit(self._park_fn, donate_argnums=(0, 1), **release_sh)

    # ---- jitted bodies ----
    # Static arguments are positional: jit takes no keyword arguments once in_shardings are given.
    def _prefill_fn(self, params, cache, sampler, tokens, start, length, slot, values, seen, kv_window, want_lp):
        """One chunk of one prompt: tokens (1, T) at positions start..start+T-1, `length` real."""
        t = tokens.shape[1]
        idx = jnp.arange(t, dtype=jnp.int32)
        positions = jnp.where(idx < length, start + idx, self._parked)[None]
        rows = slot[None]
        logits, cache = forward(
            params, self.config, tokens, positions, cache, logits_at=(length - 1)[None],
            cache_rows=rows, kv_window=kv_window, attention_impl=self.attention_impl,
        )
        sampler = set_row(sampler, slot, values, seen)
        row_state = jax.tree.map(lambda a: a[rows], sampler)
        token = sample(logits, row_state, (start + length)[None])
        sampler = record_row(sampler, slot, token[0])
        out = (token,) + (token_logprobs(logits, token, MAX_TOP_LOGPROBS) if want_lp else ())
        return cache, sampler, out

    def _decode_fn(self, params, cache, sampler, tokens, positions, steps, kv_window, want_lp):
        def body(carry, _):
            cache, sampler, tokens, positions = carry
            logits, cache = forward(
                params, self.config, tokens[:, None], positions[:, None], cache,
                logits_at=jnp.zeros_like(tokens), kv_window=kv_window, attention_impl=self.attention_impl,
            )
            nxt = sample(logits, sampler, positions + 1)
            sampler = record(sampler, nxt)
            out = (nxt,) + (token_logprobs(logits, nxt, MAX_TOP_LOGPROBS) if want_lp else ())
            return (cache, sampler, nxt, positions + 1), out

        (cache, sampler, tokens, positions), outs = jax.lax.scan(
            body, (cache, sampler, tokens, positions), None, length=steps
        )
        return cache, sampler, tokens, positions, outs

    def _park_fn(self, positions, sampler, slot):
        # A parked slot samples greedily, so it never makes the decode step take the sorting path.
        return positions.at[slot].set(self._parked), dataclasses.replace(
            sampler, temperature=sampler.temperature.at[slot].set(0.0)
        )

    # ---- host API ----
    def free_slots(self) -> list[int]:
        return [i for i, p in enumerate(self.slot_pos) if p is None]

    def bucket_for(self, n: int) -> int:
        return next((b for b in self.prefill_buckets if b >= n), self.prefill_buckets[-1])

    def kv_window_for(self, n: int) -> int:
        """Smallest power-of-two window (at least MIN_KV_WINDOW) holding n slots, capped at the cache."""
        w = MIN_KV_WINDOW
        while w < n:
            w *= 2
        return min(w, self.max_seq_len)

    def prefill(self, slot: int, prompt: list[int], sampling: SamplingParams, seed: int) -> StepOutput:
        """Fill `slot` with `prompt` and sample its first token."""
        if self.slot_pos[slot] is not None:
            raise RuntimeError(f"slot {slot} is busy")
        n = len(prompt)
        if not 0 < n < self.max_seq_len:
            raise ValueError(f"prompt length {n} must be in [1, {self.max_seq_len - 1}]")
        values = {k: jnp.asarray(v) for k, v in row_values(sampling, seed).items()}
        seen = np.zeros((self.config.vocab_size,), bool)  # prompt tokens, for the repetition penalty
        seen[np.asarray(prompt)] = True
        seen = jnp.asarray(seen)
        chunk = self.prefill_buckets[-1]
        out = None
        for start in range(0, n, chunk):
            piece = prompt[start : start + chunk]
            bucket = self.bucket_for(len(piece))
            tokens = np.zeros((1, bucket), np.int32)
            tokens[0, : len(piece)] = piece
            last = start + len(piece) == n
            self.cache, self.sampler, out = self._prefill(
                self.params, self.cache, self.sampler, jnp.asarray(tokens), jnp.int32(start),
                jnp.int32(len(piece)), jnp.int32(slot), values, seen,
                self.kv_window_for(start + bucket), last and sampling.logprobs,
            )
        assert out is not None
        first = out[0]
        self.tokens = self.tokens.at[slot].set(first[0])
        self.positions = self.positions.at[slot].set(n)
        self.slot_pos[slot] = n
        return _host_output(out, (1, 1))

    def decode(self, want_logprobs: bool = False, steps: int | None = None) -> StepOutput:
        """Advance every slot by `steps` tokens; free slots compute too but write nothing."""
        steps = steps or self.decode_steps
        live = [p for p in self.slot_pos if p is not None]
        if not live:
            raise RuntimeError("decode with no active slot")
        window = self.kv_window_for(max(live) + steps)
        self.cache, self.sampler, self.tokens, self.positions, outs = self._decode(
            self.params, self.cache, self.sampler, self.tokens, self.positions, steps, window, want_logprobs,
        )
        for i, p in enumerate(self.slot_pos):
            if p is not None:
                self.slot_pos[i] = p + steps
        return _host_output(outs, (steps, self.max_slots))

    def release(self, slot: int) -> None:
        self.slot_pos[slot] = None
        self.positions, self.sampler = self._release(self.positions, self.sampler, jnp.int32(slot))


def record_row(sampler: SamplerState, slot: jax.Array, token: jax.Array) -> SamplerState:
    return dataclasses.replace(
        sampler,
        output_counts=sampler.output_counts.at[slot, token].add(1),
        seen=sampler.seen.at[slot, token].set(True),
    )


def _host_output(out: tuple, shape: tuple[int, int]) -> StepOutput:
    host = jax.device_get(out)
    tokens = np.asarray(host[0]).reshape(shape)
    if len(host) == 1:
        return StepOutput(tokens)
    lp, top_lp, top_ids = host[1:]
    return StepOutput(
        tokens,
        np.asarray(lp).reshape(shape),
        np.asarray(top_lp).reshape(shape + (MAX_TOP_LOGPROBS,)),
        np.asarray(top_ids).reshape(shape + (MAX_TOP_LOGPROBS,)),
    )

