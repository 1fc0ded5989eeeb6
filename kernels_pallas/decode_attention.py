"""Flash-decoding: one new query token per sequence over its KV cache, split over the key axis.

Grid (batch, kv_head, split). One program takes the G query heads of one KV head as the rows of a
tile (padded to 16 rows for Triton's dot) and runs an online softmax over its share of the
sequence's live slots [0, length). The shares are sized from the actual length, not the cache
size, so a short sequence in a long cache still spreads over all splits. Each split writes its
unnormalised output, running max and sum; the splits are combined in jnp. A split with no live slots
writes (0, -inf, 0), which gets weight exp2(-inf) = 0 in the combine.
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

# Programs to aim for when num_splits is not given: about two waves on a 132-SM H100.
_TARGET_PROGRAMS = 256


def _decode_kernel(
    length_ref,  # () int32: live slots of this sequence
    q_ref,  # (rows, D): the group's query heads, zero-padded to rows
    k_ref,  # (max(S, block_k), D): the whole cache of this (batch, kv_head), tiny caches padded
    v_ref,  # like k_ref
    o_ref,  # (rows, D) float32, unnormalised
    m_ref,  # (rows,) float32, running max (base 2)
    l_ref,  # (rows,) float32, running sum
    *,
    num_slots: int,  # S, the real cache size
    num_splits: int,
    block_k: int,
    scale: float,
) -> None:
    rows, head_dim = q_ref.shape
    split = pl.program_id(2)
    length = jnp.minimum(length_ref[...], num_slots)
    blocks_per_split = cdiv(cdiv(length, block_k), num_splits)
    split_start = split * blocks_per_split * block_k
    split_end = jnp.minimum(split_start + blocks_per_split * block_k, length)
    num_blocks = cdiv(jnp.maximum(split_end - split_start, 0), block_k)

    q = q_ref[...]
    key_iota = lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    qk_scale = scale * LOG2E  # softmax in base 2

    def step(j: jax.Array, carry: Carry) -> Carry:
        acc, m, l = carry
        start = split_start + j * block_k
        # A tile overrunning the cache is loaded at a clamped start; slots before `start` belong to
        # the previous tile and are masked.
        load_start = jnp.minimum(start, k_ref.shape[0] - block_k)
        k = k_ref[pl.ds(load_start, block_k), :]
        v = v_ref[pl.ds(load_start, block_k), :]
        s = tile_dot(q, k, transpose_b=True)
        slot = load_start + key_iota
        s = jnp.where((slot >= start) & (slot < split_end), s * qk_scale, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + tile_dot(p.astype(v.dtype), v)
        return acc, m_new, l

    acc, m, l = lax.fori_loop(
        0,
        num_blocks,
        step,
        (
            jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
        ),
    )
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def default_num_splits(batch: int, kv_heads: int, num_slots: int, block_k: int) -> int:
    """Enough splits that batch * kv_heads * splits fills the GPU, at most one per key tile."""
    return max(1, min(pl.cdiv(_TARGET_PROGRAMS, batch * kv_heads), pl.cdiv(num_slots, block_k)))


@functools.partial(
    jax.jit, static_argnames=("block_k", "num_splits", "num_warps", "num_stages", "interpret")
)
def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> jax.Array:
    """GQA attention of one query per sequence over the first lengths[b] slots of its cache.

    Args:
      q: (B, H, D) queries, rotary applied.
      k, v: (B, S, K, D) the cache (H a multiple of K).
      lengths: (B,) int32 live slots per sequence, 1 <= lengths[b] <= S (larger is clamped to S).
      block_k: cache slots per key tile, a power of 2 >= 16 (shrunk to fit small caches); default
        128 for 16-bit inputs, 64 for float32 (two pipelined K/V tiles must fit in shared memory).
      num_splits: key-axis splits per (sequence, kv head); default from `default_num_splits`.
      num_warps, num_stages: Triton launch parameters (GPU only).
      interpret: Pallas interpret mode; default: when the default backend is not a GPU.

    Returns:
      (B, H, D) in q.dtype.
    """
    batch, num_heads, head_dim = q.shape
    num_slots, kv_heads = k.shape[1], k.shape[2]
    group = num_heads // kv_heads
    if num_heads % kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({kv_heads})")
    if block_k is None:
        block_k = 128 if k.dtype.itemsize <= 2 else 64
    block_k = fit_key_block(block_k, num_slots)
    if num_splits is None:
        num_splits = default_num_splits(batch, kv_heads, num_slots, block_k)
    rows = max(MIN_DOT_DIM, pl.next_power_of_2(group))

    qg = q.reshape(batch, kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    k = pad_slots(k, block_k)
    v = pad_slots(v, block_k)

    kernel = functools.partial(
        _decode_kernel,
        num_slots=num_slots,
        num_splits=num_splits,
        block_k=block_k,
        scale=head_dim**-0.5,
    )
    kv_spec = pl.BlockSpec((None, k.shape[1], None, head_dim), lambda b, h, s: (b, 0, h, 0))
    split_shape = (batch, kv_heads, num_splits, rows)
    acc, m, l = pl.pallas_call(
        kernel,
        out_shape=(
            out_struct(split_shape + (head_dim,), jnp.float32, q),
            out_struct(split_shape, jnp.float32, q),
            out_struct(split_shape, jnp.float32, q),
        ),
        grid=(batch, kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=(
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=resolve_interpret(interpret),
        name="llama_decode_attention",
    )(lengths.astype(jnp.int32), qg, k, v)

    # Combine the splits: rescale each to the global max; empty splits (m = -inf) get weight 0.
    weight = jnp.exp2(m - jnp.max(m, axis=2, keepdims=True))
    out = jnp.sum(weight[..., None] * acc, axis=2) / jnp.sum(weight * l, axis=2)[..., None]
    return out[:, :, :group].reshape(batch, num_heads, head_dim).astype(q.dtype)
