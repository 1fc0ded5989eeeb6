"""Pure-jnp references for the kernels, in their own calling conventions.

Deliberately naive and independent of the kernels' tricks: everything in float32 at highest
precision, K/V repeated over the query heads of their group, a dense mask and a plain softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
    """q (B, T, H, D); k, v (B, S, K, D); positions (B, T): query t sees slots <= positions[:, t]."""
    group = q.shape[2] // k.shape[2]
    qf = q.astype(jnp.float32)
    kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    vf = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    highest = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bthd,bshd->bhts", qf, kf, precision=highest)
    scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
    visible = jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), vf, precision=highest)
    return out.astype(q.dtype)


def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, offsets: jax.Array) -> jax.Array:
    """Reference for `flash_attention`: q (B, T, H, D) at positions offsets[:, None] + arange(T)."""
    positions = offsets[:, None] + jnp.arange(q.shape[1], dtype=jnp.int32)[None, :]
    return _masked_attention(q, k, v, positions)


def decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reference for `decode_attention`: q (B, H, D) sees the first lengths[b] slots."""
    return _masked_attention(q[:, None], k, v, (lengths - 1)[:, None])[:, 0]
