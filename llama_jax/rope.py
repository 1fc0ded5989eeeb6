"""Rotary position embeddings with Llama 3.1's "llama3" frequency scaling.

Weights use the half-split ("rotate_half") layout: within a head, dimension i pairs with
i + head_dim/2. Meta's interleaved layout is converted at the border (convert/meta.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import LlamaConfig, RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Per-pair inverse frequencies, (head_dim/2,) float32, computed on the host."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return freqs.astype(np.float32)
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * np.pi / freqs
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = np.where(wavelen < high_wavelen, freqs, np.where(wavelen > low_wavelen, freqs / scaling.factor, blended))
    return scaled.astype(np.float32)


def rope_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of each position's angles: (B, T, head_dim/2) float32."""
    inv = jnp.asarray(inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x (B, T, N, head_dim) by the angles of cos/sin (B, T, head_dim/2), in float32."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
