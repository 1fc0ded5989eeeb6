"""Attention over a KV cache: one entry point, a pure-jnp reference, Pallas kernels behind an option.

Shapes (B batch, T new tokens, S cache slots, H query heads, K kv heads, G = H // K, D head_dim):
  q:           (B, T, H, D)   queries of the new tokens, rotary already applied
  k, v:        (B, S, K, D)   the whole cache, the new tokens already written at their positions
  q_positions: (B, T) int32   absolute position of each query; cache slot j holds position j

Query at position p sees cache slots j <= p (causal over absolute positions). Slots past a
sequence's length hold stale values; no valid query can see them.
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


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, impl: AttentionImpl = "xla"
) -> jax.Array:
    if impl == "xla":
        return attention_reference(q, k, v, q_positions)
    if impl == "pallas":
        from kernels_pallas import attention as pallas_attention

        return pallas_attention(q, k, v, q_positions)
    raise ValueError(f"attention impl must be 'xla' or 'pallas', got {impl!r}")
