"""Attention over a KV cache: one entry point, a pure-jnp reference, Pallas kernels behind an option.

Shapes (B batch, T new tokens, S cache slots, H query heads, K kv heads, G = H // K, D head_dim):
  q:           (B, T, H, D)   queries of the new tokens, rotary already applied
  k, v:        (B, S, K, D)   the whole cache, the new tokens already written at their positions
  q_positions: (B, T) int32   absolute position of each query; cache slot j holds position j

Query at position p sees cache slots j <= p (causal over absolute positions). Slots past a
sequence's length hold stale values; no valid query can see them.

`block_decode_attention` is the decode form (T = 1) over a ragged list of cache blocks, so each
row reads only the blocks its own length needs.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AttentionImpl = Literal["xla", "pallas"]


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array) -> jax.Array:
    """Grouped-query attention in plain jnp; K/V are never repeated over query heads."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    slots = jnp.arange(k.shape[1], dtype=jnp.int32)
    visible = slots[None, None, :] <= q_positions[:, :, None]  # (B, T, S)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def block_decode_attention(
    q: jax.Array, k_blocks: jax.Array, v_blocks: jax.Array, q_positions: jax.Array, block_rows: jax.Array,
    block_starts: jax.Array,
) -> jax.Array:
    """Decode attention over a ragged list of N cache blocks of P slots (flash-decoding in jnp).

    q (B, 1, H, D) and q_positions (B, 1) as in `attention`; k_blocks, v_blocks (N, P, K, D):
    block n holds slots block_starts[n] .. block_starts[n] + P - 1 of row block_rows[n]. Each block
    gives a partial softmax (its max, sum and weighted values); the blocks of one row combine by
    their maxima. A block whose row is B (padding) is dropped; a row with no block gets zeros.
    """
    b, _, h, d = q.shape
    n, p, kv_heads, _ = k_blocks.shape
    rows = jnp.minimum(block_rows, b - 1)
    qn = q[rows, 0].reshape(n, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("nkgd,npkd->nkgp", qn, k_blocks, preferred_element_type=jnp.float32) * (d**-0.5)
    slots = block_starts[:, None] + jnp.arange(p, dtype=jnp.int32)
    visible = (slots <= q_positions[rows, 0][:, None]) & (block_rows < b)[:, None]  # (N, P)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    peak = scores.max(-1)  # (N, K, G); -inf where the block has nothing visible
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0)[..., None])
    partial = jnp.einsum("nkgp,npkd->nkgd", probs.astype(v_blocks.dtype), v_blocks,
                         preferred_element_type=jnp.float32)
    row_peak = jax.ops.segment_max(peak, block_rows, num_segments=b)  # out-of-range rows dropped
    row_peak = jnp.where(jnp.isfinite(row_peak), row_peak, 0.0)
    weight = jnp.exp(peak - row_peak[rows])  # 0 for blocks with nothing visible
    total = jax.ops.segment_sum(probs.sum(-1) * weight, block_rows, num_segments=b)
    out = jax.ops.segment_sum(partial * weight[..., None], block_rows, num_segments=b)
    out = out / jnp.where(total > 0, total, 1.0)[..., None]
    return out.reshape(b, 1, h, d).astype(q.dtype)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, impl: AttentionImpl = "xla"
) -> jax.Array:
    if impl == "xla":
        return attention_reference(q, k, v, q_positions)
    if impl == "pallas":
        from kernels_pallas import attention as pallas_attention

        return pallas_attention(q, k, v, q_positions)
    raise ValueError(f"attention impl must be 'xla' or 'pallas', got {impl!r}")
