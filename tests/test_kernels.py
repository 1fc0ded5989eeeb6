"""Pallas attention kernels against pure-jnp references, in interpret mode on CPU.

Shapes stay small (S <= 256) because interpret mode runs every grid step as XLA ops.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_inputs import attention_inputs, with_stale_tail
import kernels_pallas
from kernels_pallas import decode_attention, flash_attention
from kernels_pallas.reference import decode_attention_reference, flash_attention_reference
from llama_jax.attention import attention as llama_attention
from llama_jax.attention import attention_reference

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _assert_close(out: jax.Array, ref: jax.Array, dtype) -> None:
    assert out.dtype == ref.dtype
    tol = TOLERANCE[dtype]
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


# (batch, tokens, slots, kv_heads, group, head_dim, offsets, dtype, block_q, block_k)
PREFILL_CASES = [
    # T and S not multiples of the blocks; second sequence continues a cache (offset > 0) and
    # reaches the last slot, so the last key tile is loaded at a clamped start; a query tile of
    # the first ends on the first slot of a key tile.
    (2, 37, 100, 2, 2, 64, (1, 63), jnp.float32, 16, 32),
    # Second prompt exactly fills the cache; first starts just before a key-tile boundary;
    # single-head groups; D = 128.
    (2, 16, 64, 2, 1, 128, (14, 48), jnp.bfloat16, 16, 16),
    # G = 4 folded into 64-row tiles; ragged offsets; unmasked and masked key phases both used.
    (2, 50, 200, 2, 4, 64, (5, 130), jnp.bfloat16, 16, 64),
    # Two-token chunk over a cache smaller than one key tile (padded to 16 slots); the second
    # sequence's last position is past the cache (as for padding), so it sees the whole cache.
    (2, 2, 10, 1, 2, 64, (0, 9), jnp.float32, 16, 16),
    # Default block sizes, float32, D = 128, G = 4.
    (1, 70, 256, 2, 4, 128, (100,), jnp.float32, None, 64),
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"B{c[0]}T{c[1]}S{c[2]}K{c[3]}G{c[4]}D{c[5]}")
def test_flash_attention_matches_reference(case) -> None:
    batch, tokens, slots, kv_heads, group, head_dim, offsets, dtype, block_q, block_k = case
    q, k, v = attention_inputs(0, batch, tokens, slots, kv_heads, group, head_dim, dtype)
    offsets = np.asarray(offsets, np.int32)
    k = with_stale_tail(k, offsets + tokens, 1)
    v = with_stale_tail(v, offsets + tokens, 2)
    out = flash_attention(q, k, v, jnp.asarray(offsets), block_q=block_q, block_k=block_k, interpret=True)
    _assert_close(out, flash_attention_reference(q, k, v, jnp.asarray(offsets)), dtype)


# (batch, slots, kv_heads, group, head_dim, lengths, dtype, block_k, num_splits)
DECODE_CASES = [
    # Ragged lengths: 1, not a block multiple, the whole cache; more splits than live tiles.
    (3, 100, 2, 4, 64, (1, 37, 100), jnp.float32, 16, 8),
    # One split, G = 1, D = 128.
    (2, 64, 2, 1, 128, (64, 17), jnp.bfloat16, 32, 1),
    # G = 2, splits not dividing the tile count, cache not a block multiple.
    (2, 200, 1, 2, 64, (199, 65), jnp.bfloat16, 32, 3),
    # Cache smaller than one key tile (padded to 16 slots); length 1, and one past the cache (as
    # for padding rows), which sees the whole cache.
    (2, 9, 2, 2, 64, (1, 12), jnp.float32, 16, 2),
    # Default block size and split count.
    (2, 256, 2, 4, 128, (256, 130), jnp.float32, None, None),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"B{c[0]}S{c[1]}K{c[2]}G{c[3]}D{c[4]}")
def test_decode_attention_matches_reference(case) -> None:
    batch, slots, kv_heads, group, head_dim, lengths, dtype, block_k, num_splits = case
    q, k, v = attention_inputs(3, batch, 1, slots, kv_heads, group, head_dim, dtype)
    lengths = np.asarray(lengths, np.int32)
    k = with_stale_tail(k, lengths, 4)
    v = with_stale_tail(v, lengths, 5)
    out = decode_attention(
        q[:, 0], k, v, jnp.asarray(lengths), block_k=block_k, num_splits=num_splits, interpret=True
    )
    _assert_close(out, decode_attention_reference(q[:, 0], k, v, jnp.asarray(lengths)), dtype)


def test_random_shapes() -> None:
    """Random small shapes, offsets, lengths and split counts through both kernels."""
    rng = np.random.default_rng(0)
    for trial in range(4):
        dtype = (jnp.float32, jnp.bfloat16)[trial % 2]
        batch, kv_heads = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        group, head_dim = int(rng.choice([1, 2, 4])), int(rng.choice([64, 128]))
        slots = int(rng.integers(2, 160))
        tokens = int(rng.integers(2, slots + 1))
        offsets = rng.integers(0, slots - tokens + 1, size=batch).astype(np.int32)
        q, k, v = attention_inputs(10 + trial, batch, tokens, slots, kv_heads, group, head_dim, dtype)
        out = flash_attention(q, k, v, jnp.asarray(offsets), block_q=16, block_k=32, interpret=True)
        _assert_close(out, flash_attention_reference(q, k, v, jnp.asarray(offsets)), dtype)

        lengths = rng.integers(1, slots + 1, size=batch).astype(np.int32)
        splits = int(rng.integers(1, 5))
        out = decode_attention(
            q[:, 0], k, v, jnp.asarray(lengths), block_k=16, num_splits=splits, interpret=True
        )
        _assert_close(out, decode_attention_reference(q[:, 0], k, v, jnp.asarray(lengths)), dtype)


@pytest.mark.parametrize("tokens", [1, 24])
def test_attention_dispatch_matches_model_reference(tokens: int) -> None:
    """The model's entry point with impl="pallas", under jit, against its own reference."""
    q, k, v = attention_inputs(20, 2, tokens, 96, 2, 4, 64, jnp.float32)
    positions = jnp.asarray([[0], [60]], jnp.int32) + jnp.arange(tokens, dtype=jnp.int32)[None, :]
    out = jax.jit(lambda *a: llama_attention(*a, impl="pallas"))(q, k, v, positions)
    assert out.shape == q.shape
    _assert_close(out, attention_reference(q, k, v, positions), jnp.float32)
    # An explicit interpret flag reaches the kernels: on CPU, False must fail to lower.
    direct = kernels_pallas.attention(q, k, v, positions, interpret=True)
    _assert_close(direct, out, jnp.float32)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret"):
            kernels_pallas.attention(q, k, v, positions, interpret=False)


_SHARDED_CHECK = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    import kernels_pallas
    from llama_jax.attention import attention_reference

    assert jax.device_count() >= 8, jax.devices()
    mesh = jax.make_mesh((8,), ("tp",))
    heads = NamedSharding(mesh, P(None, None, "tp"))
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    batch, tokens, slots, kv_heads, group, head_dim = 2, 20, 64, 8, 2, 64
    q = jax.random.normal(kq, (batch, tokens, kv_heads * group, head_dim))
    k = jax.random.normal(kk, (batch, slots, kv_heads, head_dim))
    v = jax.random.normal(kv, (batch, slots, kv_heads, head_dim))
    positions = jnp.asarray([[3], [40]], jnp.int32) + jnp.arange(tokens, dtype=jnp.int32)[None]
    q, k, v = (jax.device_put(x, heads) for x in (q, k, v))
    positions = jax.device_put(positions, NamedSharding(mesh, P()))
    sharded = jax.jit(jax.shard_map(
        kernels_pallas.attention, mesh=mesh, in_specs=(P(None, None, "tp"),) * 3 + (P(),),
        out_specs=P(None, None, "tp")))
    for t in (tokens, 1):
        out = sharded(q[:, :t], k, v, positions[:, :t])
        assert out.sharding.spec[2] == "tp", out.sharding
        err = float(jnp.max(jnp.abs(out - attention_reference(q[:, :t], k, v, positions[:, :t]))))
        print(f"T={t} max_err={err:.3e}")
        assert err < 1e-5, err
    """
)


def test_sharded_over_kv_heads() -> None:
    """kernels_pallas.attention inside shard_map with 8 KV heads over 8 simulated devices ('tp')."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_CHECK], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "T=20 max_err=" in result.stdout and "T=1 max_err=" in result.stdout


def _jaxlib_version() -> tuple[int, ...]:
    import jaxlib.version

    return tuple(jaxlib.version.__version_info__)


@pytest.mark.skipif(
    jax.default_backend() != "gpu" and _jaxlib_version() > (0, 10, 2),
    reason="lowering to Triton without a GPU needs jaxlib <= 0.10.2 (later ones compile at lowering)",
)
def test_kernels_lower_to_triton() -> None:
    """Both kernels lower through Pallas' Triton backend for CUDA at Llama 3.1 8B head shapes.

    Without a GPU this checks the Pallas -> Triton IR lowering (tile shapes, dots, loops), not
    Triton's own compilation to PTX.
    """
    batch, tokens, slots, kv_heads, heads, head_dim = 2, 300, 1000, 8, 32, 128
    for dtype in (jnp.bfloat16, jnp.float32):
        cache = jax.ShapeDtypeStruct((batch, slots, kv_heads, head_dim), dtype)
        ints = jax.ShapeDtypeStruct((batch,), jnp.int32)
        for fn, q_shape in (
            (flash_attention, (batch, tokens, heads, head_dim)),
            (decode_attention, (batch, heads, head_dim)),
        ):
            q = jax.ShapeDtypeStruct(q_shape, dtype)
            lowered = jax.jit(lambda *a, fn=fn: fn(*a, interpret=False)).trace(q, cache, cache, ints)
            text = lowered.lower(lowering_platforms=("cuda",)).as_text()
            assert "triton" in text, fn.__name__
