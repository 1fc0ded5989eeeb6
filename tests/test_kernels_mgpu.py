"""The Mosaic GPU (Hopper) prefill kernel against the pure-jnp reference, in Mosaic GPU interpret mode.

The interpreter runs every warpgroup of every block as a thread on the CPU, with simulated SMEM,
TMA copies and barriers, and checks the barrier protocol and (with detect_races) SMEM races. It is
slow (about a second per block), so shapes stay tiny: a few blocks, caches of a few key tiles.
Interpret mode stages the matmul operands through SMEM (see the kernel's docstring), so the
compiled path is also lowered for CUDA here, which needs no GPU, and run on a GPU when present.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_inputs import attention_inputs, with_stale_tail
import kernels_pallas
from kernels_pallas.flash_attention_mgpu import InterpretGPUParams, flash_attention_mgpu
from kernels_pallas.reference import flash_attention_reference

# Only jax releases before the Mosaic GPU interpreter (< 0.10) lack it.
mgpu_interpret = pytest.importorskip(
    "jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call",
    reason=f"jax {jax.__version__} has no Mosaic GPU interpret mode",
)

# bf16 operands (P rounded to bf16 before P V), float32 softmax and accumulation.
TOLERANCE = 2e-2


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    # A failed kernel leaves the interpreter's global state behind; start each test clean.
    mgpu_interpret.reset_gpu_interpret_mode_state()
    yield


def _check(case, *, seed: int = 0, detect_races: bool = False) -> None:
    batch, tokens, slots, kv_heads, group, head_dim, offsets, dtype, block_q, block_k, stages = case
    q, k, v = attention_inputs(seed, batch, tokens, slots, kv_heads, group, head_dim, dtype)
    offsets = np.asarray(offsets, np.int32)
    k = with_stale_tail(k, offsets + tokens, seed + 1)
    v = with_stale_tail(v, offsets + tokens, seed + 2)
    params = InterpretGPUParams(detect_races=detect_races)
    out = flash_attention_mgpu(
        q, k, v, jnp.asarray(offsets), block_q=block_q, block_k=block_k, num_stages=stages, interpret=params
    )
    ref = flash_attention_reference(q, k, v, jnp.asarray(offsets))
    assert out.shape == q.shape and out.dtype == q.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=TOLERANCE, atol=TOLERANCE)
    if detect_races:
        assert not mgpu_interpret.get_races().races_found


# (batch, tokens, slots, kv_heads, group, head_dim, offsets, dtype, block_q, block_k, num_stages)
CASES = [
    # G = 4 over two compute warpgroups (32 tokens per block); T = 40 is not a block multiple, so
    # the second block's second warpgroup holds only padding. The second sequence continues a
    # cache (offset 90) up to its last slot: S = 130 is padded to 136 slots (TMA needs whole
    # 8-row tiles) and the last key tile is loaded at a clamped start. Three key tiles, two stages:
    # a slot is refilled.
    (2, 40, 130, 1, 4, 64, (0, 90), jnp.bfloat16, 128, 64, 2),
    # G = 1, D = 128, one compute warpgroup; the first sequence starts just before a key-tile
    # boundary, the second fills the cache exactly (S a block multiple); five key tiles through
    # three stages.
    (2, 40, 320, 1, 1, 128, (30, 280), jnp.bfloat16, 64, 64, 3),
    # Two-token chunk, G = 2, over a cache smaller than one key tile (padded, padding masked);
    # the second sequence's last position is past the cache, so it sees the whole cache; float32
    # inputs are computed in bf16 and returned as float32.
    (2, 2, 20, 1, 2, 64, (0, 19), jnp.float32, 128, 64, 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}S{c[2]}K{c[3]}G{c[4]}D{c[5]}")
def test_matches_reference(case) -> None:
    _check(case)


def test_pipeline_has_no_smem_races() -> None:
    """Race detection on: every SMEM read of a K/V slot happens after its TMA copy landed (ready
    barrier) and before the producer refills it (free barrier)."""
    _check((1, 16, 200, 1, 8, 64, (150,), jnp.bfloat16, 128, 64, 2), seed=3, detect_races=True)


def test_matches_triton_kernel_random_shapes() -> None:
    """Random small shapes and offsets, against the reference and our portable Triton kernel."""
    rng = np.random.default_rng(0)
    for trial in range(2):
        group = int(rng.choice([1, 2, 4]))
        slots = int(rng.integers(64, 200))
        tokens = int(rng.integers(2, min(slots, 48) + 1))
        offsets = rng.integers(0, slots - tokens + 1, size=2).astype(np.int32)
        q, k, v = attention_inputs(10 + trial, 2, tokens, slots, 1, group, 64, jnp.bfloat16)
        out = flash_attention_mgpu(q, k, v, jnp.asarray(offsets), block_k=64, interpret=InterpretGPUParams())
        ref = flash_attention_reference(q, k, v, jnp.asarray(offsets))
        triton = kernels_pallas.flash_attention(q, k, v, jnp.asarray(offsets), interpret=True)
        for other in (ref, triton):
            np.testing.assert_allclose(
                np.asarray(out, np.float32), np.asarray(other, np.float32), rtol=TOLERANCE, atol=TOLERANCE
            )


@pytest.mark.parametrize(
    ("shapes", "kwargs", "match"),
    [
        (((1, 8, 4, 96), (1, 64, 1, 96)), {}, "head_dim must be a multiple of 64"),
        (((1, 8, 3, 64), (1, 64, 2, 64)), {}, "multiple of kv heads"),
        (((1, 8, 128, 64), (1, 64, 1, 64)), {}, "must divide 64"),
        (((1, 8, 4, 64), (1, 64, 1, 64)), {"block_q": 96}, "block_q"),
        (((1, 8, 4, 64), (1, 64, 1, 64)), {"block_k": 32}, "block_k"),
        (((1, 8, 4, 256), (1, 64, 1, 256)), {"block_k": 256, "num_stages": 3}, "shared memory"),
    ],
)
def test_rejects_unsupported_shapes(shapes, kwargs, match) -> None:
    q_shape, kv_shape = shapes
    q, kv = jnp.zeros(q_shape, jnp.bfloat16), jnp.zeros(kv_shape, jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        flash_attention_mgpu(q, kv, kv, jnp.zeros((q_shape[0],), jnp.int32), interpret=True, **kwargs)


@pytest.mark.parametrize(
    ("shape", "dtype", "kwargs"),
    [
        # Llama 3.1 8B heads (H = 32, K = 8, D = 128), default blocks: two compute warpgroups.
        ((2, 300, 1000, 8, 4, 128), jnp.bfloat16, {}),
        # S not a multiple of 8 (padded), float32 inputs, one compute warpgroup, three stages.
        ((1, 37, 130, 2, 2, 64), jnp.float32, {"block_q": 64, "block_k": 64, "num_stages": 3}),
    ],
)
def test_lowers_to_mosaic_gpu(shape, dtype, kwargs) -> None:
    """The compiled path (register P, transposed K view, real layouts) lowers for CUDA.

    Pallas lowers Mosaic GPU kernels to NVVM-level MLIR at jax lowering time, without a GPU: this
    checks wgmma shapes and operand layouts, TMA/SMEM tiling and the barrier code that interpret
    mode does not, but not ptxas, register allocation or the run on hardware.
    """
    batch, tokens, slots, kv_heads, group, head_dim = shape
    q = jax.ShapeDtypeStruct((batch, tokens, kv_heads * group, head_dim), dtype)
    cache = jax.ShapeDtypeStruct((batch, slots, kv_heads, head_dim), dtype)
    offsets = jax.ShapeDtypeStruct((batch,), jnp.int32)
    fn = jax.jit(lambda *a: flash_attention_mgpu(*a, interpret=False, **kwargs))
    text = fn.trace(q, cache, cache, offsets).lower(lowering_platforms=("cuda",)).as_text()
    for op in ("mosaic_gpu", "wgmma.mma_async", "cp.async.bulk.tensor", "mbarrier"):
        assert op in text, op


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles for a Hopper GPU; none here")
def test_compiled_on_gpu_matches_reference() -> None:
    """On the GPU machine: the compiled kernel (register P, transposed K view) at Llama 3.1 8B heads."""
    q, k, v = attention_inputs(7, 2, 300, 1000, 8, 4, 128, jnp.bfloat16)
    offsets = jnp.asarray([0, 700], jnp.int32)
    out = flash_attention_mgpu(q, k, v, offsets, interpret=False)
    ref = flash_attention_reference(q, k, v, offsets)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=TOLERANCE, atol=TOLERANCE)
