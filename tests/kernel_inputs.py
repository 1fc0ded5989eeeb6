"""Random attention inputs shared by the kernel tests (tests/test_kernels*.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def attention_inputs(seed: int, batch: int, tokens: int, slots: int, kv_heads: int, group: int, head_dim: int,
                     dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random normal q (B, T, H, D) and cache k, v (B, S, K, D)."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (batch, tokens, kv_heads * group, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, slots, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, slots, kv_heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v


def with_stale_tail(x: jax.Array, lengths: np.ndarray, seed: int) -> jax.Array:
    """Overwrite slots >= lengths[b] with large random values: no valid query may see them."""
    stale = 100.0 * jax.random.normal(jax.random.PRNGKey(seed), x.shape, jnp.float32).astype(x.dtype)
    live = jnp.arange(x.shape[1])[None, :, None, None] < jnp.asarray(lengths)[:, None, None, None]
    return jnp.where(live, x, stale)
