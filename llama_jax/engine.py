"""The inference engine: fixed decode slots over one KV cache, with jitted, bucketed steps.

- Prefill runs prompts into slots, padded to a length bucket (chunked past the largest bucket)
  and a power-of-two number of rows, so a new prompt length or count never compiles a new
  program. Prompts admitted together share one call per length bucket. `prefill_next` runs one
  chunk of each prompt per call, so a scheduler can interleave a long prompt with decoding.
- Decode advances the live slots by `decode_steps` tokens in one dispatch (a scan inside jit),
  computing the first power-of-two number of slots that holds them all (the scheduler fills the
  lowest free slot first).
- Attention reads only the first `kv_window` cache slots, a power-of-two bucket that covers the
  longest live sequence, so short sequences do not pay for the full context. Decode with the jnp
  attention reads instead, when that is not more, a ragged list of KV_BLOCK-slot blocks, each row
  only the blocks it has: one long conversation among short ones does not slow them all.
- The cache and sampler state are donated to every step and updated in place.
- Speculative decoding (`speculation`, speculative.py): `verify` feeds each live slot's last token
  and its n-gram draft in one pass and keeps the drafted tokens the sampler would have drawn, so
  a dispatch yields 1 to num_tokens + 1 tokens per slot (StepOutput.counts). `speculation` may
  be set or cleared between calls.
- Structured output: `constrain` sets the tokens a slot may sample next (the prefill takes the
  first token's set with the job); the caller decodes such slots one step at a time.
- Prefix reuse: the engine records, per slot, the tokens whose keys and values its cache rows
  hold, and they outlive the request. A prompt that starts with them (the next turn of a chat)
  can be prefilled into that slot from where they stop (`cached_prefix`, `PrefillJob.cached`);
  `copy_prefix` gives a free slot the start of another's (a system prompt a running request has).
- On one CPU device, decode runs feature-major (`model.decode_feature_major`, on (out, in) copies
  of the weights), which XLA's CPU backend runs faster at a few rows; prefill uses the weights as
  stored.

The engine knows nothing of text or requests: `scheduler.py` drives it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import lora
from .attention import AttentionImpl
from .config import LlamaConfig
from .model import (
    KVBlocks, KVCache, Params, decode_feature_major, feature_major_params, feature_major_problem, forward,
)
from .sampling import (
    MAX_TOP_LOGPROBS, SamplerState, SamplingParams, bias_row, constrain_rows, record, record_rows, row_values, sample,
    set_rows, token_logprobs,
)
from .speculative import NgramSpeculation
from .structured import mask_words

# Prompt lengths are padded up to one of these, so a prompt pays for at most half again its own
# length (16 -> 24 tokens aside); each bucket is one program per power-of-two row count.
DEFAULT_PREFILL_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
MIN_KV_WINDOW = 128
KV_BLOCK = 128  # slots per block of block decode attention


@dataclasses.dataclass(frozen=True)
class PrefillJob:
    """One prompt to prefill into a free slot, with its sampling parameters and seed."""

    slot: int
    prompt: list[int]
    sampling: SamplingParams
    seed: int
    stop_ids: tuple[int, ...] = ()  # not sampled before sampling.min_tokens tokens
    allowed: np.ndarray | None = None  # bitmask of the tokens the first may be (structured.Matcher.mask)
    cached: int = 0  # prompt tokens already in the slot's cache (at most cached_prefix(slot, prompt, adapter))
    adapter: int = 0  # the LoRA adapter the slot runs (lora.attach_many; 0: the base model)


@dataclasses.dataclass
class StepOutput:
    """Tokens of one engine call, host-side. Shapes: (steps, rows) for decode (column i: slot i),
    (1, prompts) for prefill (column i: prompt i)."""

    tokens: np.ndarray
    logprobs: np.ndarray | None = None  # chosen-token log-probabilities
    top_logprobs: np.ndarray | None = None  # (..., MAX_TOP_LOGPROBS)
    top_ids: np.ndarray | None = None
    counts: np.ndarray | None = None  # (rows,): the tokens of column i are its first counts[i] (verify); None: all

    def count(self, column: int) -> int:
        return self.tokens.shape[0] if self.counts is None else int(self.counts[column])


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
        feature_major_decode: bool | None = None,
        speculation: NgramSpeculation | None = None,
    ):
        """`feature_major_decode`: decode with (out, in) copies of the weights and the residual
        stream as columns (model.decode_feature_major), which XLA's CPU backend runs faster at
        a few rows, for a second copy of the layer weights in memory. None: on for plain weights
        on one CPU device with the jnp attention.
        `speculation`: draft tokens by prompt lookup for `verify` (None: no speculative decoding)."""
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
        self.config = config
        self.params = params
        self.shardings = shardings
        self.max_slots = max_slots
        self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)
        self.prefill_buckets = tuple(sorted(b for b in prefill_buckets if b <= self.max_seq_len)) or (self.max_seq_len,)
        self.decode_steps = decode_steps
        self.attention_impl = attention_impl
        self.speculation = speculation
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
        verify_sh: dict[str, Any] = {}
        release_sh: dict[str, Any] = {}
        constrain_sh: dict[str, Any] = {}
        resume_sh: dict[str, Any] = {}
        copy_sh: dict[str, Any] = {}
        if shardings is None:
            # Committed to the device like every step's outputs: the first call then compiles the
            # same program as all later ones (an uncommitted argument is a different program).
            device = jax.devices()[0]
            self._new_state = lambda: jax.device_put(state(), device)
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
            self._new_state = jax.jit(state, out_shardings=state_sh)
            prefill_sh = dict(
                in_shardings=(shardings.params, cache_sh, sampler_sh) + (rep,) * 9,
                out_shardings=(cache_sh, sampler_sh, rep),
            )
            decode_sh = dict(in_shardings=(shardings.params,) + state_sh + (rep, rep), out_shardings=state_sh + (rep,))
            verify_sh = dict(in_shardings=(shardings.params,) + state_sh + (rep, rep),
                             out_shardings=state_sh + (rep, rep))
            release_sh = dict(in_shardings=(rows, sampler_sh, rep), out_shardings=(rows, sampler_sh))
            constrain_sh = dict(in_shardings=(sampler_sh, rep, rep), out_shardings=sampler_sh)
            resume_sh = dict(in_shardings=(sampler_sh, rows) + (rep,) * 5, out_shardings=(sampler_sh, rows))
            copy_sh = dict(in_shardings=(cache_sh, rep, rep, rep), out_shardings=cache_sh)
        self._all_rows = shardings is not None and shardings.dp > 1  # see decode_rows
        # Copying cache rows between slots indexes the slot axis: not with slots split over devices.
        self.can_copy_prefix = not self._all_rows
        # Block decode attention gathers blocks across rows: not with slots split over devices.
        # The Pallas decode kernel reads each row's own length anyway.
        self._blocks_ok = attention_impl == "xla" and not self._all_rows and self.max_seq_len % KV_BLOCK == 0
        self._no_blocks = (jnp.zeros((0,), jnp.int32),) * 2  # decode over the dense window
        if feature_major_decode is None:
            feature_major_decode = (shardings is None and attention_impl == "xla" and jax.default_backend() == "cpu"
                                    and feature_major_problem(params) is None)
        elif feature_major_decode and (shardings is not None or attention_impl != "xla"):
            raise ValueError("feature_major_decode needs one device (no shardings) and attention_impl='xla'")
        self._decode_params = feature_major_params(params) if feature_major_decode else params
        # Several LoRA adapters (lora.attach_many): each call routes its rows to their slots' adapters.
        self.adapters = lora.adapter_count(params)
        self._route_rows = 1 << (max_slots - 1).bit_length()  # the most rows a call has
        self.feature_major_decode = feature_major_decode
        self.cache, self.sampler, self.tokens, self.positions = self._new_state()
        # Host mirror: position of each slot's last token, or None when the slot is free.
        self.slot_pos: list[int | None] = [None] * max_slots
        # Slots whose prompt is partly in the cache (prefill_next): tokens written so far.
        self.filling: dict[int, int] = {}
        # Host record of each slot's cache rows: row s holds the keys and values of
        # history[s, :history_len[s]] (prompt, then every token fed to decode), kept after release.
        self._history = np.zeros((max_slots, self.max_seq_len), np.int32)
        self._history_len = np.zeros((max_slots,), np.int64)
        self._adapter = np.zeros((max_slots,), np.int32)  # the adapter that wrote them (and decodes the slot)
        self._last = np.zeros((max_slots,), np.int32)  # each live slot's next decode input
        self._prefill = jax.jit(self._prefill_fn, static_argnums=(12, 13), donate_argnums=(1, 2), **prefill_sh)
        self._decode = jax.jit(self._decode_fn, static_argnums=(7, 8, 9, 10), donate_argnums=(1, 2, 3, 4), **decode_sh)
        self._verify = jax.jit(self._verify_fn, static_argnums=(7, 8, 9), donate_argnums=(1, 2, 3, 4), **verify_sh)
        self.drafted = self.accepted = 0  # draft tokens verified, and those kept (speculation)
        self._release = jax.jit(self._park_fn, donate_argnums=(0, 1), **release_sh)
        self._constrain = jax.jit(constrain_rows, donate_argnums=(0,), **constrain_sh)
        self._resume = jax.jit(_resume_row, donate_argnums=(0, 1), **resume_sh)
        self._copy = jax.jit(_copy_rows, static_argnums=(4,), donate_argnums=(0,), **copy_sh)

    # ---- jitted bodies ----
    # Static arguments are positional: jit takes no keyword arguments once in_shardings are given.
    def _prefill_fn(self, params, cache, sampler, tokens, start, length, slots, values, seen, bias, stops, allowed,
                    kv_window, want_lp):
        """One chunk of N prompts: row i's tokens (N, T) at positions start[i]..start[i]+T-1,
        length[i] of them real, into slot slots[i]. Padding rows (slot == max_slots, length 0)
        write nothing: their positions are parked past the cache and their sampler rows dropped."""
        t = tokens.shape[1]
        idx = jnp.arange(t, dtype=jnp.int32)[None]
        positions = jnp.where(idx < length[:, None], start[:, None] + idx, self._parked)
        rows = jnp.minimum(slots, self.max_slots - 1)  # padding rows read some real row
        logits, cache = forward(
            params, self.config, tokens, positions, cache, logits_at=jnp.maximum(length - 1, 0),
            cache_rows=rows, kv_window=kv_window, attention_impl=self.attention_impl,
        )
        sampler = set_rows(sampler, slots, values, seen, bias, stops, allowed)
        token = sample(logits, jax.tree.map(lambda a: a[rows], sampler), start + length)
        sampler = record_rows(sampler, slots, token)
        out = (token,) + (token_logprobs(logits, token, MAX_TOP_LOGPROBS) if want_lp else ())
        return cache, sampler, out

    def _decode_fn(self, params, cache, sampler, tokens, positions, block_rows, block_starts, steps, kv_window,
                   want_lp, rows):
        """`steps` tokens for slots [0, rows) (`rows` static); later slots are neither computed nor changed.
        Attention reads the first `kv_window` slots, or with kv_window None the blocks given by
        block_rows and block_starts (see model.KVBlocks)."""
        # All slots: row b is cache row b (a scatter batching dimension; see model._update_cache).
        cache_rows = jnp.arange(rows) if rows < self.max_slots else None
        blocks = None if kv_window else KVBlocks(block_rows, block_starts, KV_BLOCK)

        def body(carry, _):
            cache, sampler, tokens, positions = carry
            if self.feature_major_decode:  # `params` are feature_major_params
                logits, cache = decode_feature_major(
                    params, self.config, tokens[:, None], positions[:, None], cache, cache_rows=cache_rows,
                    kv_window=kv_window, kv_blocks=blocks,
                )
            else:
                logits, cache = forward(
                    params, self.config, tokens[:, None], positions[:, None], cache, logits_at=jnp.zeros_like(tokens),
                    cache_rows=cache_rows, kv_window=kv_window, kv_blocks=blocks, attention_impl=self.attention_impl,
                )
            nxt = sample(logits, sampler, positions + 1)
            sampler = record(sampler, nxt)
            out = (nxt,) + (token_logprobs(logits, nxt, MAX_TOP_LOGPROBS) if want_lp else ())
            return (cache, sampler, nxt, positions + 1), out

        head = lambda a: a[:rows]  # noqa: E731
        (cache, sub, new_tokens, new_positions), outs = jax.lax.scan(
            body, (cache, jax.tree.map(head, sampler), head(tokens), head(positions)), None, length=steps
        )
        put = lambda full, first: full.at[:rows].set(first)  # noqa: E731
        sampler = jax.tree.map(put, sampler, sub)
        return cache, sampler, put(tokens, new_tokens), put(positions, new_positions), outs

    def _verify_fn(self, params, cache, sampler, tokens, positions, drafts, n_draft, kv_window, want_lp, rows):
        """For slots [0, rows): feed the last token and the draft, drafts[b, :n_draft[b]], at the
        following positions in one pass, then sample position after position, going on past
        position i only while the token sampled there equals draft token i. Returns the sampled
        tokens (K + 1, rows) and how many of them each row keeps (1 + the draft tokens accepted)."""
        cache_rows = jnp.arange(rows) if rows < self.max_slots else None
        head = lambda a: a[:rows]  # noqa: E731
        sub, last, start = jax.tree.map(head, sampler), head(tokens), head(positions)
        width = drafts.shape[1] + 1
        fed = jnp.concatenate([last[:, None], drafts], axis=1)
        at = start[:, None] + jnp.arange(width, dtype=jnp.int32)[None]  # parked rows stay past the cache
        logits, cache = forward(params, self.config, fed, at, cache, cache_rows=cache_rows, kv_window=kv_window,
                                attention_impl=self.attention_impl)
        index = jnp.arange(rows)
        padded = jnp.concatenate([drafts, drafts[:, :1]], axis=1)  # position K's comparison is never used

        def body(carry, i):
            sub, going, kept = carry
            nxt = sample(logits[:, i], sub, start + i + 1)
            # Only rows still going count the token (penalties, min_tokens); others drop their update.
            sub = record_rows(sub, jnp.where(going, index, rows), nxt)
            kept = kept + going
            going = going & (i < n_draft) & (nxt == padded[:, i])
            out = (nxt,) + (token_logprobs(logits[:, i], nxt, MAX_TOP_LOGPROBS) if want_lp else ())
            return (sub, going, kept), out

        (sub, _, kept), outs = jax.lax.scan(
            body, (sub, jnp.ones((rows,), bool), jnp.zeros((rows,), jnp.int32)), jnp.arange(width)
        )
        newest = jnp.take_along_axis(outs[0], (kept - 1)[None], axis=0)[0]
        put = lambda full, first: full.at[:rows].set(first)  # noqa: E731
        sampler = jax.tree.map(put, sampler, sub)
        return cache, sampler, put(tokens, newest), put(positions, start + kept), outs, kept

    def _park_fn(self, positions, sampler, slot):
        # A parked slot samples greedily, so it never makes the decode step take the sorting path.
        return positions.at[slot].set(self._parked), dataclasses.replace(
            sampler, temperature=sampler.temperature.at[slot].set(0.0)
        )

    # ---- host API ----
    def free_slots(self) -> list[int]:
        return [i for i, p in enumerate(self.slot_pos) if p is None and i not in self.filling]

    def bucket_for(self, n: int) -> int:
        return next((b for b in self.prefill_buckets if b >= n), self.prefill_buckets[-1])

    def kv_window_for(self, n: int) -> int:
        """Smallest power-of-two window (at least MIN_KV_WINDOW) holding n slots, capped at the cache."""
        w = MIN_KV_WINDOW
        while w < n:
            w *= 2
        return min(w, self.max_seq_len)

    def held_tokens(self, slot: int) -> int:
        """How many tokens' keys and values the cache rows of `slot` hold (see cached_prefix)."""
        return int(self._history_len[slot])

    def cached_prefix(self, slot: int, prompt: Sequence[int], adapter: int = 0) -> int:
        """How many leading tokens of `prompt` the cache rows of `slot` already hold, as `adapter`
        computes them (keys and values differ between adapters), leaving at least one to prefill
        (its logits give the first token)."""
        n = min(int(self._history_len[slot]), len(prompt) - 1)
        if n <= 0 or self._adapter[slot] != adapter:
            return 0
        differ = np.flatnonzero(self._history[slot, :n] != np.asarray(prompt[:n], np.int32))
        return int(differ[0]) if differ.size else n

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make the cache rows of the free slot `dst` start with the first `n` tokens that those of
        `src` hold (`src` may be live or filling): a prompt sharing them then prefills from `n`.
        Costs a pass over both slots' rows, far less than prefilling `n` tokens."""
        if not self.can_copy_prefix:
            raise ValueError("cache rows cannot be copied between slots split over devices (dp > 1)")
        if dst not in self.free_slots() or src == dst:
            raise ValueError(f"copy_prefix needs a free destination slot other than the source, got {src} -> {dst}")
        if not 0 < n <= self._history_len[src]:
            raise ValueError(f"slot {src} holds {self._history_len[src]} tokens; cannot copy {n}")
        self.cache = self._copy(self.cache, jnp.int32(src), jnp.int32(dst), jnp.int32(n), self.kv_window_for(n))
        self._history[dst, :n] = self._history[src, :n]
        self._history_len[dst] = n
        self._adapter[dst] = self._adapter[src]

    def _record(self, slot: int, start: int, tokens: Sequence[int]) -> None:
        """The cache rows of `slot` from position `start` on now hold `tokens` (past the end: dropped)."""
        end = min(start + len(tokens), self.max_seq_len)
        self._history[slot, start:end] = np.asarray(tokens[: end - start], np.int32)
        self._history_len[slot] = end

    def prefill(self, slot: int, prompt: list[int], sampling: SamplingParams, seed: int) -> StepOutput:
        """Fill `slot` with `prompt` and sample its first token."""
        return self.prefill_many([PrefillJob(slot, prompt, sampling, seed)])

    def prefill_many(self, jobs: Sequence[PrefillJob]) -> StepOutput:
        """Fill each job's slot with its whole prompt and sample its first token (column i: job i)."""
        columns: dict[int, StepOutput] = {}
        while True:
            pending = [i for i in range(len(jobs)) if i not in columns]
            for i, c in zip(pending, self.prefill_next([jobs[i] for i in pending])):
                if c is not None:
                    columns[i] = c
            if len(columns) == len(jobs):
                return _stack_columns([columns[i] for i in range(len(jobs))])

    def prefill_next(self, jobs: Sequence[PrefillJob]) -> list[StepOutput | None]:
        """Write the next piece of each job's prompt into its slot, in one call per length bucket.

        If the rest of a prompt fits the largest bucket, it is written whole, the slot goes live and
        its first token is sampled: entry i of the result (a (1, 1) StepOutput). Otherwise the next
        largest-bucket chunk is written, entry i is None and the slot stays reserved (`filling`, not
        free, not decoded) until a later call with the same job finishes it."""
        if not jobs:
            raise ValueError("no prompts to prefill")
        slots = [j.slot for j in jobs]
        if len(set(slots)) != len(slots):
            raise ValueError(f"two prompts for one slot: {slots}")
        for j in jobs:
            if not 0 <= j.slot < self.max_slots:
                raise ValueError(f"slot {j.slot} is outside [0, {self.max_slots})")
            if self.slot_pos[j.slot] is not None:
                raise RuntimeError(f"slot {j.slot} is busy")
            if not 0 < len(j.prompt) < self.max_seq_len:
                raise ValueError(f"prompt length {len(j.prompt)} must be in [1, {self.max_seq_len - 1}]")
            if not 0 <= j.adapter <= self.adapters:
                raise ValueError(f"adapter {j.adapter} is outside [0, {self.adapters}]")
            if j.slot not in self.filling and not 0 <= j.cached <= self.cached_prefix(j.slot, j.prompt, j.adapter):
                raise ValueError(f"slot {j.slot} does not hold the first {j.cached} tokens of the prompt")
        chunk = self.prefill_buckets[-1]
        starts = [self.filling.get(j.slot, j.cached) for j in jobs]
        final = [len(j.prompt) - s <= chunk for j, s in zip(jobs, starts)]
        groups: dict[int, list[int]] = {}  # length bucket -> job indices
        for i, j in enumerate(jobs):
            groups.setdefault(self.bucket_for(len(j.prompt) - starts[i]) if final[i] else chunk, []).append(i)
        columns: list[StepOutput | None] = [None] * len(jobs)
        for bucket, members in groups.items():
            lp = any(final[i] and jobs[i].sampling.logprobs for i in members)
            out = self._prefill_chunk([(jobs[i], starts[i]) for i in members], bucket, want_lp=lp)
            for c, i in enumerate(members):
                if final[i]:
                    columns[i] = _column(out, c)
                else:
                    self.filling[jobs[i].slot] = starts[i] + chunk
        done = [i for i in range(len(jobs)) if final[i]]
        if done:
            index = jnp.asarray(np.array([slots[i] for i in done], np.int32))
            firsts = np.array([columns[i].tokens[0, 0] for i in done], np.int32)
            lengths = np.array([len(jobs[i].prompt) for i in done], np.int32)
            self.tokens = self.tokens.at[index].set(jnp.asarray(firsts))
            self.positions = self.positions.at[index].set(jnp.asarray(lengths))
            self._last[[slots[i] for i in done]] = firsts
            for i in done:
                self.filling.pop(slots[i], None)
                self.slot_pos[slots[i]] = len(jobs[i].prompt)
        return columns

    def _prefill_chunk(self, pieces: list[tuple[PrefillJob, int]], bucket: int, want_lp: bool) -> StepOutput:
        """Run prompt chunks job.prompt[start : start + bucket] of several jobs in one call."""
        n = 1 << (len(pieces) - 1).bit_length()  # rows padded to a power of two
        vocab = self.config.vocab_size
        tokens = np.zeros((n, bucket), np.int32)
        start = np.zeros((n,), np.int32)
        length = np.zeros((n,), np.int32)
        slots = np.full((n,), self.max_slots, np.int32)
        seen = np.zeros((n, vocab), bool)  # prompt tokens, for the repetition penalty
        bias = np.zeros((n, vocab), np.float32)
        stops = np.zeros((n, vocab), bool)
        allowed = np.full((n, mask_words(vocab)), -1, np.int32)  # every token
        rows = [row_values(j.sampling, j.seed) for j, _ in pieces]
        rows += [rows[0]] * (n - len(pieces))
        for r, (j, s) in enumerate(pieces):
            piece = j.prompt[s : s + bucket]
            self._record(j.slot, s, piece)
            self._adapter[j.slot] = j.adapter
            tokens[r, : len(piece)] = piece
            start[r], length[r], slots[r] = s, len(piece), j.slot
            seen[r, np.asarray(j.prompt)] = True
            bias[r] = bias_row(j.sampling, vocab)
            stops[r, list(j.stop_ids)] = True
            if j.allowed is not None:
                allowed[r] = j.allowed
        values = {k: jnp.asarray(np.stack([v[k] for v in rows])) for k in rows[0]}
        self.cache, self.sampler, out = self._prefill(
            self._routed(self.params, [j.adapter for j, _ in pieces]), self.cache, self.sampler, jnp.asarray(tokens), jnp.asarray(start), jnp.asarray(length),
            jnp.asarray(slots), values, jnp.asarray(seen), jnp.asarray(bias), jnp.asarray(stops), jnp.asarray(allowed),
            self.kv_window_for(int(start.max()) + bucket), want_lp,
        )
        return _host_output(out, (1, n))

    def constrain(self, slots: Sequence[int], masks: np.ndarray) -> None:
        """Limit the next token of each slot in `slots` to the tokens of its bitmask, a row of
        `masks` (N, ceil(V / 32)) int32 (structured.Matcher.mask). It holds until the slot's
        next prefill or constrain: decode such slots one step at a time."""
        n = 1 << (len(slots) - 1).bit_length()  # rows padded to a power of two: few programs
        rows = np.full((n,), self.max_slots, np.int32)  # padding rows are dropped
        rows[: len(slots)] = slots
        words = np.full((n, mask_words(self.config.vocab_size)), -1, np.int32)
        words[: len(slots)] = masks
        self.sampler = self._constrain(self.sampler, jnp.asarray(rows), jnp.asarray(words))

    def resume(self, slot: int, prompt: Sequence[int], output: Sequence[int], min_tokens: int = 0) -> None:
        """Continue, in live `slot`, a request that was stopped (preempted) after generating
        `output` from `prompt`: the slot has just been prefilled with prompt + output[:-1], and the
        token that prefill sampled is dropped. output[-1] becomes the next decode input, and the
        sampler counts `output` as generated (penalties; stop tokens banned until `min_tokens`), so
        the request goes on as it would have, seeded sampling included (its stream follows positions)."""
        if not output:
            raise ValueError("resume needs the request's output so far (at least one token)")
        n = len(prompt) + len(output) - 1
        if self.slot_pos[slot] != n:
            raise ValueError(f"slot {slot} does not hold a prefilled prompt of {n} tokens (prompt + output[:-1])")
        vocab = self.config.vocab_size
        check = np.asarray(output, np.int64)
        if not (0 <= check.min() and check.max() < vocab):
            raise ValueError(f"output token ids outside the vocabulary [0, {vocab})")
        counts = np.bincount(check, minlength=vocab).astype(np.int32)
        seen = counts > 0
        seen[np.asarray(prompt, np.int64)] = True
        self.sampler, self.tokens = self._resume(
            self.sampler, self.tokens, jnp.int32(slot), jnp.asarray(counts), jnp.asarray(seen),
            jnp.int32(min_tokens - len(output)), jnp.int32(output[-1]),
        )
        self._last[slot] = output[-1]

    def decode_rows(self) -> int:
        """Rows the next decode computes: slots [0, rows) cover every live slot. A power of two
        (at most max_slots), so a few programs serve any occupancy; all slots with dp sharding,
        whose slot axis is split over devices."""
        live = [i for i, p in enumerate(self.slot_pos) if p is not None]
        if self._all_rows or not live:
            return self.max_slots
        return min(1 << max(live).bit_length(), self.max_slots)

    def decode(self, want_logprobs: bool = False, steps: int | None = None) -> StepOutput:
        """Advance every live slot by `steps` tokens. Tokens come back as (steps, rows), column
        i for slot i, for the first `decode_rows()` slots: free slots among them compute too but
        write nothing; slots past them (all free) are not computed."""
        steps = steps or self.decode_steps
        args = self._decode_args(steps, want_logprobs)
        self.cache, self.sampler, self.tokens, self.positions, outs = self._decode(*args)
        out = _host_output(outs, (steps, args[-1]))
        for i, p in enumerate(self.slot_pos):
            if p is not None:  # fed this call: the last token, then all sampled but the newest
                self._record(i, p, [int(self._last[i]), *out.tokens[:-1, i].tolist()])
                self._last[i] = out.tokens[-1, i]
                self.slot_pos[i] = p + steps
        return out

    def draft(self, slot: int) -> np.ndarray:
        """The speculative draft for live `slot`: what its sequence (prompt and output so far)
        suggests comes next (NgramSpeculation.draft); empty without speculation."""
        if self.speculation is None or self.slot_pos[slot] is None:
            return np.zeros((0,), np.int32)
        n = int(self._history_len[slot])
        return self.speculation.draft(np.append(self._history[slot, :n], self._last[slot]))

    def verify(self, drafts: dict[int, Sequence[int]], want_logprobs: bool = False) -> StepOutput:
        """Advance every live slot by one token and as many tokens of its draft (`drafts[slot]`,
        at most speculation.num_tokens; absent: none) as the sampler draws in turn (see
        `_verify_fn`). Tokens come back as (num_tokens + 1, rows) with `counts`: column i holds
        slot i's new tokens in its first counts[i] entries."""
        if self.speculation is None:
            raise RuntimeError("verify needs an engine built with speculation")
        live = [p for p in self.slot_pos if p is not None]
        if not live:
            raise RuntimeError("verify with no active slot")
        k = self.speculation.num_tokens
        rows = self.decode_rows()
        table = np.zeros((rows, k), np.int32)
        lengths = np.zeros((rows,), np.int32)
        for slot, draft in drafts.items():
            if self.slot_pos[slot] is None:
                raise ValueError(f"a draft for slot {slot}, which is not live")
            if len(draft) > k:
                raise ValueError(f"a draft of {len(draft)} tokens; the engine verifies at most {k}")
            check = np.asarray(draft, np.int64)
            if check.size and not (0 <= check.min() and check.max() < self.config.vocab_size):
                raise ValueError(f"draft token ids outside the vocabulary [0, {self.config.vocab_size})")
            table[slot, : len(draft)], lengths[slot] = draft, len(draft)
        window = self.kv_window_for(max(live) + k + 1)
        self.cache, self.sampler, self.tokens, self.positions, outs, kept = self._verify(
            self._routed(self.params, self._adapter), self.cache, self.sampler, self.tokens, self.positions,
            jnp.asarray(table), jnp.asarray(lengths), window, want_logprobs, rows,
        )
        out = _host_output(outs, (k + 1, rows))
        out.counts = np.asarray(jax.device_get(kept))
        for i, p in enumerate(self.slot_pos):
            if p is not None:  # fed and kept: the last token, then the accepted draft tokens
                n = int(out.counts[i])
                self._record(i, p, [int(self._last[i]), *table[i, : n - 1].tolist()])
                self._last[i] = out.tokens[n - 1, i]
                self.slot_pos[i] = p + n
                self.drafted += int(lengths[i])
                self.accepted += n - 1
        return out

    def lower_decode(self, want_logprobs: bool = False) -> jax.stages.Lowered:
        """The program the next `decode()` runs, lowered (for inspecting its HLO)."""
        return self._decode.lower(*self._decode_args(self.decode_steps, want_logprobs))

    def _decode_args(self, steps: int, want_logprobs: bool) -> tuple:
        live = [p for p in self.slot_pos if p is not None]
        if not live:
            raise RuntimeError("decode with no active slot")
        rows = self.decode_rows()
        window = self.kv_window_for(max(live) + steps)
        blocks = self._decode_blocks(rows, steps, window)
        return (self._routed(self._decode_params, self._adapter), self.cache, self.sampler, self.tokens, self.positions,
                *(blocks or self._no_blocks), steps, None if blocks else window, want_logprobs, rows)

    def _routed(self, params: Params, adapters: Sequence[int]) -> Params:
        """`params` whose batch row i runs LoRA adapter adapters[i] (rows past them: none), if
        several are held; the routing array has one length for every call, so nothing recompiles."""
        if not self.adapters:
            return params
        rows = np.zeros((self._route_rows,), np.int32)
        rows[: len(adapters)] = adapters
        return lora.route(params, rows)

    def _decode_blocks(self, rows: int, steps: int, window: int) -> tuple[jax.Array, jax.Array] | None:
        """The (rows, starts) block list of a decode of `steps` tokens for the first `rows` slots
        (free slots get none), padded to a power of two; None when it holds more slots than the
        dense window of every row. (At equal slots the blocks were as fast or faster on CPU: the
        dense window is transposed for the attention products, the gathered blocks are small.)"""
        if not self._blocks_ok:
            return None
        pairs = [(row, start) for row, p in enumerate(self.slot_pos[:rows]) if p is not None
                 for start in range(0, min(p + steps, self.max_seq_len), KV_BLOCK)]
        n = 1 << (len(pairs) - 1).bit_length()
        if n * KV_BLOCK > rows * window:
            return None
        pairs += [(rows, 0)] * (n - len(pairs))  # padding blocks: row `rows` is dropped
        table = np.array(pairs, np.int32)
        return jnp.asarray(table[:, 0]), jnp.asarray(table[:, 1])

    def set_params(self, params: Params) -> None:
        """Run `params` from the next step on: weights of the same structure, shapes and dtypes
        (a LoRA adapter slot rewritten, lora.put), so nothing recompiles."""
        old = jax.tree.map(lambda a: (a.shape, a.dtype), self.params)
        if jax.tree.map(lambda a: (a.shape, a.dtype), params) != old:
            raise ValueError("the new parameters differ from the engine's in structure, shape or dtype")
        if self.shardings is not None:
            params = jax.device_put(params, self.shardings.params)
        self.params = params
        self._decode_params = feature_major_params(params) if self.feature_major_decode else params

    def forget_prefixes(self, adapter: int) -> None:
        """Drop what the free slots' cache rows hold as computed by `adapter` (its weights changed):
        no later prompt reuses those keys and values."""
        for slot in range(self.max_slots):
            if self.slot_pos[slot] is None and slot not in self.filling and self._adapter[slot] == adapter:
                self._history_len[slot] = 0

    def reset(self) -> None:
        """Free every slot and start from a fresh cache and sampler state: after a step that
        failed (or was interrupted), whose donated buffers may be gone."""
        for a in jax.tree.leaves((self.cache, self.sampler, self.tokens, self.positions)):
            if not a.is_deleted():  # freed first: the device may not hold two caches
                a.delete()
        self.cache, self.sampler, self.tokens, self.positions = self._new_state()
        self.slot_pos = [None] * self.max_slots
        self.filling.clear()
        self._history_len[:] = 0

    def release(self, slot: int) -> None:
        self.slot_pos[slot] = None
        self.filling.pop(slot, None)
        self.positions, self.sampler = self._release(self.positions, self.sampler, jnp.int32(slot))


def _resume_row(sampler: SamplerState, tokens: jax.Array, slot: jax.Array, counts: jax.Array, seen: jax.Array,
                min_left: jax.Array, last: jax.Array) -> tuple[SamplerState, jax.Array]:
    """Engine.resume's device half: row `slot`'s output statistics and next decode input."""
    return dataclasses.replace(
        sampler, output_counts=sampler.output_counts.at[slot].set(counts), seen=sampler.seen.at[slot].set(seen),
        min_left=sampler.min_left.at[slot].set(min_left),
    ), tokens.at[slot].set(last)


def _copy_rows(cache: KVCache, src: jax.Array, dst: jax.Array, n: jax.Array, width: int) -> KVCache:
    """Positions [0, n) of slot `src` written over those of slot `dst`, in every layer (and the
    scales of an int8 cache: every leaf is (layers, slots, positions, ...)). `width` (static,
    at least n) bounds the positions read and written."""

    def copy(a: jax.Array) -> jax.Array:
        size = (a.shape[0], 1, width, *a.shape[3:])
        at_src, at_dst = ((0, slot) + (0,) * (a.ndim - 2) for slot in (src, dst))
        keep = (jnp.arange(width) < n).reshape((1, 1, -1) + (1,) * (a.ndim - 3))
        rows = jnp.where(keep, jax.lax.dynamic_slice(a, at_src, size), jax.lax.dynamic_slice(a, at_dst, size))
        return jax.lax.dynamic_update_slice(a, rows, at_dst)

    return jax.tree.map(copy, cache)


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


def _column(out: StepOutput, c: int) -> StepOutput:
    pick = lambda a: None if a is None else a[:, c : c + 1]  # noqa: E731
    return StepOutput(pick(out.tokens), pick(out.logprobs), pick(out.top_logprobs), pick(out.top_ids))


def _stack_columns(columns: Sequence[StepOutput]) -> StepOutput:
    """One StepOutput of (1, 1) columns. Columns computed without log-probabilities (their jobs
    did not ask, while another job's did) get zeros there."""
    tokens = np.concatenate([c.tokens for c in columns], axis=1)
    if all(c.logprobs is None for c in columns):
        return StepOutput(tokens)
    zero = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    fields = [(c.logprobs, c.top_logprobs, c.top_ids) if c.logprobs is not None
              else (zero(1, 1), zero(1, 1, MAX_TOP_LOGPROBS), zero(1, 1, MAX_TOP_LOGPROBS).astype(np.int32))
              for c in columns]
    return StepOutput(tokens, *(np.concatenate(f, axis=1) for f in zip(*fields)))
