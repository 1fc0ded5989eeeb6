"""Pieces shared by the prefill and decode kernels."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pl_triton

# Finite stand-in for -inf on masked scores: exp2(MASK_VALUE - m) underflows to 0, and a row whose
# first tile is fully masked never computes inf - inf (which -inf would, giving NaN).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
# Triton's tl.dot needs every matmul dimension >= 16 (and power-of-2 tile shapes).
MIN_DOT_DIM = 16

# Older jax releases name it TritonCompilerParams. Passing Triton params explicitly also
# keeps the Triton lowering selected when a jax release makes Mosaic GPU the default.
_TritonCompilerParams = getattr(pl_triton, "CompilerParams", None) or getattr(pl_triton, "TritonCompilerParams")


def resolve_interpret(interpret: bool | None) -> bool:
    """Interpret mode unless the default backend is a GPU, or the caller's explicit choice."""
    return jax.default_backend() != "gpu" if interpret is None else interpret


def triton_params(num_warps: int, num_stages: int) -> object:
    return _TritonCompilerParams(num_warps=num_warps, num_stages=num_stages)


def fit_key_block(block_k: int, num_slots: int) -> int:
    """Largest power-of-2 key tile <= block_k that fits in the cache (but never below MIN_DOT_DIM).

    The last key tile of a loop is loaded at a start clamped to `num_slots - block_k`, so it stays
    inside the cache without padding it; that needs block_k <= num_slots.
    """
    if block_k < MIN_DOT_DIM or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of 2 >= {MIN_DOT_DIM}, got {block_k}")
    while block_k > MIN_DOT_DIM and block_k > num_slots:
        block_k //= 2
    return block_k


def pad_slots(x: jax.Array, num_slots: int) -> jax.Array:
    """Pad axis 1 (cache slots) of a tiny cache up to num_slots; padded slots are never visible."""
    if x.shape[1] >= num_slots:
        return x
    return jnp.pad(x, ((0, 0), (0, num_slots - x.shape[1]), (0, 0), (0, 0)))


def cdiv(a: jax.Array, b: int) -> jax.Array:
    """Ceiling division of a non-negative traced int32 by a static int (plain truncating divide)."""
    return lax.div(a + (b - 1), jnp.int32(b))


def out_struct(shape: tuple[int, ...], dtype: jnp.dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """Output spec for pallas_call that, inside shard_map(check_vma=True), varies over the same mesh
    axes as `like` (pallas_call cannot infer it)."""
    axis_type = getattr(jax.typeof(like), "manual_axis_type", None)
    if axis_type is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=axis_type)


def tile_dot(a: jax.Array, b: jax.Array, *, transpose_b: bool = False) -> jax.Array:
    """2-D matmul of tiles accumulated in float32 (a @ b.T when transpose_b).

    HIGHEST makes the Triton lowering use IEEE float32 for float32 tiles instead of its default TF32;
    bf16 tiles are unaffected.
    """
    contract_b = 1 if transpose_b else 0
    return lax.dot_general(
        a,
        b,
        (((1,), (contract_b,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
