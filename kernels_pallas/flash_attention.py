"""Causal flash attention for prefill, with grouped-query attention inside the kernel.

Grid (batch, kv_head, query block). One program takes `block_q` consecutive query tokens and all G
query heads of one KV head, folded into a (block_q * G, D) tile whose row r is token r // G, head
r % G, so each K/V tile is loaded once for the whole group and K/V are never repeated in memory.
The key loop is an online softmax over `block_k` slots in two phases: tiles entirely at or before
the tile's first query position need no mask; the rest (up to the tile's last query position) are
masked per row. Tiles past the last query position are never visited.

Queries of sequence b sit at positions offsets[b] + 0 .. offsets[b] + T - 1 and see cache slots
<= their position, so a prompt chunk attends to the cache written by earlier chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas._common import (
    LOG2E,
    MASK_VALUE,
    MIN_DOT_DIM,
    cdiv,
    fit_key_block,
    out_struct,
    pad_slots,
    resolve_interpret,
    tile_dot,
    triton_params,
)

Carry = tuple[jax.Array, jax.Array, jax.Array]  # (unnormalised output, running max, running sum)


def _flash_kernel(
    offset_ref,  # () int32: position of this sequence's first query
    q_ref,  # (block_q, G, D)
    k_ref,  # (max(S, block_k), D): the whole cache of this (batch, kv_head), tiny caches padded
    v_ref,  # like k_ref
    o_ref,  # (block_q, G, D)
    *,
    num_tokens: int,
    num_slots: int,  # S, the real cache size
    block_k: int,
    scale: float,
) -> None:
    block_q, group, head_dim = q_ref.shape
    rows = block_q * group
    q_block = pl.program_id(2)
    q = q_ref[...].reshape(rows, head_dim)

    first_token = q_block * block_q
    last_token = jnp.minimum(first_token + block_q, num_tokens) - 1  # padded tail tokens excluded
    first_pos = offset_ref[...] + first_token
    last_pos = offset_ref[...] + last_token
    row_token = lax.div(lax.broadcasted_iota(jnp.int32, (rows, block_k), 0), jnp.int32(group))
    # Last visible slot per row; positions past the cache (padding) see the whole cache, not the
    # padding of a tiny one.
    row_last_slot = jnp.minimum(first_pos + row_token, num_slots - 1)
    key_iota = lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    qk_scale = scale * LOG2E  # softmax in base 2: exp(x * scale) == exp2(x * scale * log2(e))

    def step(j: jax.Array, carry: Carry, masked: bool) -> Carry:
        acc, m, l = carry
        start = j * block_k
        # Masked phase: the last tile may overrun the cache; load it at a clamped start and mask
        # the slots an earlier tile already covered.
        load_start = jnp.minimum(start, k_ref.shape[0] - block_k) if masked else start
        k = k_ref[pl.ds(load_start, block_k), :]
        v = v_ref[pl.ds(load_start, block_k), :]
        s = tile_dot(q, k, transpose_b=True) * qk_scale
        if masked:
            slot = load_start + key_iota
            s = jnp.where((slot >= start) & (slot <= row_last_slot), s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + tile_dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    # Tiles [0, num_full) lie at or before every row's position and inside the cache.
    num_full = lax.div(jnp.minimum(first_pos + 1, num_slots), jnp.int32(block_k))
    num_visible = cdiv(jnp.minimum(last_pos + 1, num_slots), block_k)
    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    acc, _, l = lax.fori_loop(num_full, num_visible, functools.partial(step, masked=True), carry)
    o_ref[...] = (acc / l[:, None]).reshape(block_q, group, head_dim).astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("block_q", "block_k", "num_warps", "num_stages", "interpret")
)
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    offsets: jax.Array,
    *,
    block_q: int | None = None,
    block_k: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal GQA flash attention of T new queries per sequence over a KV cache.

    Args:
      q: (B, T, H, D) queries, rotary applied; query t of sequence b is at position offsets[b] + t.
      k, v: (B, S, K, D) the cache (H a multiple of K); slot j holds position j.
      offsets: (B,) int32 position of each sequence's first query.
      block_q: query tokens per tile (the tile has block_q * H // K rows); default: 128 rows for
        16-bit inputs, 64 for float32.
      block_k: cache slots per key tile, a power of 2 >= 16 (shrunk to fit small caches).
      num_warps, num_stages: Triton launch parameters (GPU only); defaults by tile size and dtype.
      interpret: Pallas interpret mode; default: when the default backend is not a GPU.

    Returns:
      (B, T, H, D) in q.dtype.
    """
    batch, num_tokens, num_heads, head_dim = q.shape
    num_slots, kv_heads = k.shape[1], k.shape[2]
    group = num_heads // kv_heads
    if num_heads % kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({kv_heads})")
    if block_q is not None and (block_q & (block_q - 1) or block_q * group < MIN_DOT_DIM):
        raise ValueError(f"block_q must be a power of 2 with block_q * {group} >= {MIN_DOT_DIM}, got {block_q}")
    if block_q is None:
        # 128 rows (tokens x group heads): the usual Triton flash attention tile height for 16-bit
        # inputs with D=128 on Hopper; float32 tiles take twice the registers and shared memory.
        tile_rows = 128 if q.dtype.itemsize <= 2 else 64
        block_q = max(MIN_DOT_DIM, tile_rows // group)
    # No point tiling far past the prompt: a 20-token prompt gets a 32-token tile, not 128.
    block_q = min(block_q, max(MIN_DOT_DIM, pl.next_power_of_2(num_tokens)))
    block_k = fit_key_block(block_k, num_slots)
    if num_warps is None:
        num_warps = 8 if block_q * group * head_dim >= 128 * 128 else 4
    if num_stages is None:
        num_stages = 3 if q.dtype.itemsize <= 2 else 2

    num_q_blocks = pl.cdiv(num_tokens, block_q)
    padded_tokens = num_q_blocks * block_q
    # Padding q (never K/V) to whole tiles: padded rows compute finite garbage that is sliced off.
    q = jnp.pad(q, ((0, 0), (0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    q = q.reshape(batch, padded_tokens, kv_heads, group, head_dim)
    k = pad_slots(k, block_k)
    v = pad_slots(v, block_k)

    kernel = functools.partial(
        _flash_kernel,
        num_tokens=num_tokens,
        num_slots=num_slots,
        block_k=block_k,
        scale=head_dim**-0.5,
    )
    kv_spec = pl.BlockSpec((None, k.shape[1], None, head_dim), lambda b, h, i: (b, 0, h, 0))
    q_spec = pl.BlockSpec((None, block_q, None, group, head_dim), lambda b, h, i: (b, i, h, 0, 0))
    out = pl.pallas_call(
        kernel,
        out_shape=out_struct(q.shape, q.dtype, q),
        grid=(batch, kv_heads, num_q_blocks),
        in_specs=[pl.BlockSpec((None,), lambda b, h, i: (b,)), q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        compiler_params=triton_params(num_warps, num_stages),
        interpret=resolve_interpret(interpret),
        name="llama_flash_attention",
    )(offsets.astype(jnp.int32), q, k, v)
    return out.reshape(batch, padded_tokens, num_heads, head_dim)[:, :num_tokens]
