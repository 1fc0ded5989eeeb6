"""Pallas attention kernels for llama-jax: causal GQA flash attention (prefill) and flash-decoding.

`attention` follows the contract of `llama_jax.attention.attention`: q (B, T, H, D), the whole
KV cache k, v (B, S, K, D) with the new tokens written, q_positions (B, T) with consecutive
positions per row. Kernels run in Pallas interpret mode unless the default backend is a GPU.
`flash_attention_mgpu` is a Hopper-only (Mosaic GPU) variant of `flash_attention`; `attention`
does not dispatch to it.
"""

from __future__ import annotations

import jax

from kernels_pallas.decode_attention import decode_attention
from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.flash_attention_mgpu import flash_attention_mgpu

__all__ = ["attention", "decode_attention", "flash_attention", "flash_attention_mgpu"]


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, interpret: bool | None = None
) -> jax.Array:
    """Dispatch on the number of new tokens: T == 1 decodes, T > 1 runs prefill flash attention.

    Rows of q_positions must be consecutive (offset + arange(T)); only column 0 is read.
    """
    if q.shape[1] == 1:
        return decode_attention(q[:, 0], k, v, q_positions[:, 0] + 1, interpret=interpret)[:, None]
    return flash_attention(q, k, v, q_positions[:, 0], interpret=interpret)
