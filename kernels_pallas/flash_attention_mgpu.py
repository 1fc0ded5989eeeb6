"""Causal GQA flash attention for prefill on Hopper, written with Pallas' Mosaic GPU backend.

Same contract as `kernels_pallas.flash_attention.flash_attention`, but instead of letting Triton
schedule the memory traffic, the kernel spells it out: TMA copies into shared memory, mbarriers and
wgmma.

Tiles. GQA is folded into the query rows exactly as in the Triton kernel: the wrapper lays q out as
(B, K, T_pad * G, D), so row r of KV head h is token r // G, query head h * G + r % G, and one
`block_q`-row tile (64 or 128 rows) holds block_q // G consecutive tokens of all G heads that share
KV head h. Every K/V tile is therefore fetched once for the whole group; K/V are never repeated in
memory (laying q out so costs one transpose of q and one of the output, small next to attention).
Grid: (query tile, KV head, batch); query tiles are visited last-first so the longest causal rows
start first.

Threads (warpgroups of 128 CUDA threads). block_q // 64 compute warpgroups each own 64 rows (one
wgmma M) and one producer warpgroup issues the K/V TMA copies. SMEM holds the Q tile (reused for
the output) and `num_stages` K and V slots (2: double-buffered). Four barrier arrays drive the ring:
k_ready/v_ready[slot] complete when a TMA copy has landed; k_free/v_free[slot] complete when every
compute warpgroup has finished reading the slot (K right after Q K^T, so the next K copy overlaps
the softmax and P V). The producer refills a slot only after it is free, and at the end waits for
the last releases so every barrier phase is observed.

Compute, per key tile: S = Q K^T with wgmma (K's SMEM tile viewed transposed), online softmax in
float32 in base 2 (scores scaled by D**-0.5 * log2(e)), then P (bf16/f16, kept in registers) @ V
accumulated by wgmma into the running output. Loads and masking follow the Triton kernel: tiles
entirely at or before a warpgroup's first query position are unmasked; later tiles up to its last
real query position are masked per row (row r of a warpgroup sees slot j iff G * (j - first_pos) <=
r); tiles past the block's last query position are never loaded, and a warpgroup whose rows end
earlier than its partner's releases the extra tiles without computing. A last tile that would
overrun the cache is loaded at a start clamped so it ends with the cache, and the slots an earlier
tile covered are masked: the cache is read in place (unless S is not a multiple of 8 or is smaller
than one key tile: see the wrapper).

Interpret mode. Pallas' Mosaic GPU interpreter (jax >= 0.10) simulates warpgroups, SMEM, TMA and
barriers (it checks the barrier protocol, and SMEM races with detect_races), but its wgmma accepts
neither a transposed nor a register operand, and it has no register layouts. When interpreting, the
two matmuls stage their operands through SMEM instead (K^T and P written to per-warpgroup scratch,
P V added to the accumulator outside the wgmma) and layout casts are dropped; everything else
(pipeline, barriers, indexing, masking, softmax) is the same code. The compiled path is checked by
lowering it for CUDA, which needs no GPU (tests/test_kernels_mgpu.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas._common import LOG2E, MASK_VALUE, out_struct

try:  # Not public in jax 0.10 / 0.11; a later release may export it from plgpu.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # pragma: no cover - jax without the Mosaic GPU interpreter
    InterpretGPUParams = getattr(plgpu, "InterpretParams", None)

WG_ROWS = 64  # query rows per compute warpgroup: the M of one wgmma instruction
SWIZZLE_BYTES = 128  # widest TMA/wgmma swizzle; a swizzle row is 64 16-bit elements
SMEM_BYTES = 227 * 1024  # H100 shared memory per block
TILE_ROWS = 8  # rows of a swizzled SMEM tile; TMA into it needs the GMEM row count to be a multiple
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class _Config:
    group: int  # G = query heads per KV head
    num_tokens: int  # T (real)
    num_slots: int  # S (real cache size)
    padded_slots: int  # S rounded up to TILE_ROWS and at least block_k: the K/V arrays read
    head_dim: int
    dtype: Any
    block_q: int  # rows per tile
    block_k: int
    num_stages: int
    interpreting: bool  # Mosaic GPU interpret mode: see `_layout` and the matmul helpers

    @property
    def num_compute(self) -> int:
        return self.block_q // WG_ROWS

    @property
    def tokens_per_wg(self) -> int:
        return WG_ROWS // self.group

    @property
    def tokens_per_tile(self) -> int:
        return self.block_q // self.group

    @property
    def num_q_tiles(self) -> int:
        return pl.cdiv(self.num_tokens, self.tokens_per_tile)


def _cdiv(a: jax.Array, b: int) -> jax.Array:
    return lax.div(a + (b - 1), jnp.int32(b))


def _load_start(cfg: _Config, step: jax.Array) -> jax.Array:
    """First cache slot of key tile `step`, clamped so the TMA box stays inside the cache."""
    start = step * cfg.block_k
    if cfg.padded_slots % cfg.block_k:
        start = jnp.minimum(start, cfg.padded_slots - cfg.block_k)
    return start


def _layout(cfg: _Config, x: jax.Array, layout: Any) -> jax.Array:
    """Pin a register array to a Mosaic GPU layout (the interpreter has no layouts: identity)."""
    return x if cfg.interpreting else plgpu.layout_cast(x, layout)


def _iota(cfg: _Config, shape: tuple[int, ...], dim: int) -> jax.Array:
    if cfg.interpreting:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _kernel(offsets_ref, q_ref, k_ref, v_ref, o_ref, *, cfg: _Config) -> None:
    """Entry of one (query tile, KV head, batch) block: allocate SMEM/barriers for all warpgroups."""
    tiled = (plgpu.TilingTransform((TILE_ROWS, SWIZZLE_BYTES // 2)), plgpu.SwizzleTransform(SWIZZLE_BYTES))
    d, bk, stages = cfg.head_dim, cfg.block_k, cfg.num_stages
    smem = [
        plgpu.SMEM((cfg.num_compute, WG_ROWS, d), cfg.dtype, transforms=tiled),  # Q, then O
        plgpu.SMEM((stages, bk, d), cfg.dtype, transforms=tiled),  # K ring
        plgpu.SMEM((stages, bk, d), cfg.dtype, transforms=tiled),  # V ring
    ]
    if cfg.interpreting:
        smem += [
            plgpu.SMEM((cfg.num_compute, d, bk), cfg.dtype),  # K^T per compute warpgroup
            plgpu.SMEM((cfg.num_compute, WG_ROWS, bk), cfg.dtype),  # P per compute warpgroup
        ]
    else:
        smem += [None, None]
    barriers = [
        plgpu.Barrier(num_barriers=cfg.num_compute),  # q_ready, one per compute warpgroup
        plgpu.Barrier(num_barriers=stages),  # k_ready
        plgpu.Barrier(num_barriers=stages),  # v_ready
        plgpu.Barrier(num_arrivals=cfg.num_compute, num_barriers=stages),  # k_free
        plgpu.Barrier(num_arrivals=cfg.num_compute, num_barriers=stages),  # v_free
    ]
    pl.run_scoped(
        lambda smem_refs, barrier_refs: _block(
            offsets_ref, q_ref, k_ref, v_ref, o_ref, *smem_refs, *barrier_refs, cfg=cfg
        ),
        smem,
        barriers,
        collective_axes="wg",
    )


def _block(
    offsets_ref, q_ref, k_ref, v_ref, o_ref,
    q_smem, k_smem, v_smem, kt_smem, p_smem,
    q_ready, k_ready, v_ready, k_free, v_free,
    *,
    cfg: _Config,
) -> None:  # fmt: skip
    tile = cfg.num_q_tiles - 1 - lax.axis_index("q_tile")  # longest causal rows first
    head = lax.axis_index("kv_head")
    batch = lax.axis_index("batch")
    wg = lax.axis_index("wg")
    offset = offsets_ref[batch]

    first_token = tile * cfg.tokens_per_tile
    last_token = jnp.minimum(first_token + cfg.tokens_per_tile, cfg.num_tokens) - 1  # padding excluded
    # Key tiles the block needs: up to the last real query's position (or the end of the cache).
    num_steps = _cdiv(jnp.minimum(offset + last_token + 1, cfg.num_slots), cfg.block_k)

    @pl.when(wg < cfg.num_compute)
    def _():
        if cfg.num_compute == 2:  # 3 warpgroups: shift registers from the producer to the math
            plgpu.set_max_registers(232, action="increase")
        _compute(
            offset, tile, wg, num_steps, q_ref.at[batch, head], o_ref.at[batch, head],
            q_smem.at[wg], k_smem, v_smem, kt_smem, p_smem, q_ready.at[wg],
            k_ready, v_ready, k_free, v_free, cfg=cfg,
        )  # fmt: skip

    @pl.when(wg == cfg.num_compute)
    def _():
        if cfg.num_compute == 2:
            plgpu.set_max_registers(40, action="decrease")
        _produce(
            num_steps, k_ref.at[batch], v_ref.at[batch], head,
            k_smem, v_smem, k_ready, v_ready, k_free, v_free, cfg=cfg,
        )  # fmt: skip


def _produce(
    num_steps, k_gmem, v_gmem, head, k_smem, v_smem, k_ready, v_ready, k_free, v_free, *, cfg: _Config
) -> None:
    """Producer warpgroup: stream key tiles 0 .. num_steps - 1 through the SMEM ring."""
    stages = cfg.num_stages

    def fetch_k(step, slot):
        src = k_gmem.at[pl.ds(_load_start(cfg, step), cfg.block_k), head]
        plgpu.copy_gmem_to_smem(src, k_smem.at[slot], k_ready.at[slot])

    def fetch_v(step, slot):
        src = v_gmem.at[pl.ds(_load_start(cfg, step), cfg.block_k), head]
        plgpu.copy_gmem_to_smem(src, v_smem.at[slot], v_ready.at[slot])

    def fill(step: int) -> None:
        fetch_k(step, step)
        fetch_v(step, step)

    # Fill the ring. (At most as many tiles as the cache holds: a static slot past the cache would be
    # rejected at trace time even under a false `when`.)
    for step in range(min(stages, pl.cdiv(cfg.padded_slots, cfg.block_k))):
        pl.when(step < num_steps)(functools.partial(fill, step))

    @pl.loop(stages, num_steps)
    def _(step):
        slot = lax.rem(step, stages)
        # K and V are released separately: K right after S = Q K^T, V after P V.
        plgpu.barrier_wait(k_free.at[slot])
        fetch_k(step, slot)
        plgpu.barrier_wait(v_free.at[slot])
        fetch_v(step, slot)

    # Observe the releases of the last tiles too: every completed barrier phase is then waited for
    # by its consumer (the interpreter checks this; on hardware it keeps phase parities in step).
    @pl.loop(jnp.maximum(num_steps - stages, 0), num_steps)
    def _(step):
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])


def _compute(
    offset, tile, wg, num_steps, q_gmem, o_gmem, q_smem, k_smem, v_smem, kt_smem, p_smem,
    q_ready, k_ready, v_ready, k_free, v_free, *, cfg: _Config,
) -> None:  # fmt: skip
    """Compute warpgroup `wg`: 64 query rows against key tiles 0 .. num_steps - 1."""
    group, block_k, stages = cfg.group, cfg.block_k, cfg.num_stages
    rows = pl.ds(tile * cfg.block_q + wg * WG_ROWS, WG_ROWS)
    plgpu.copy_gmem_to_smem(q_gmem.at[rows], q_smem, q_ready)

    first_token = tile * cfg.tokens_per_tile + wg * cfg.tokens_per_wg
    first_pos = offset + first_token
    # A warpgroup holding only padding tokens pretends its first token is real, so it stays finite.
    last_token = jnp.maximum(jnp.minimum(first_token + cfg.tokens_per_wg, cfg.num_tokens) - 1, first_token)
    my_steps = jnp.minimum(_cdiv(jnp.minimum(offset + last_token + 1, cfg.num_slots), block_k), num_steps)
    # Tiles [0, num_full) lie at or before every row's position and inside the cache.
    num_full = jnp.minimum(lax.div(jnp.minimum(first_pos + 1, cfg.num_slots), jnp.int32(block_k)), my_steps)
    qk_scale = cfg.head_dim**-0.5 * LOG2E  # softmax in base 2: exp(x * scale) == exp2(x * qk_scale)

    def scores(slot) -> jax.Array:
        """S = Q K^T of one key tile, (64, block_k) float32."""

        def qk(acc_ref):
            if cfg.interpreting:
                kt_smem.at[wg][...] = k_smem.at[slot][...].T
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, q_smem, kt_smem.at[wg])
            else:
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            return acc_ref[...]  # waits for the wgmma

        return pl.run_scoped(qk, plgpu.ACC((WG_ROWS, block_k), jnp.float32))

    def accumulate_pv(acc, p, slot) -> jax.Array:
        """acc + P V of one key tile."""
        if not cfg.interpreting:

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p, v_smem.at[slot])

            return pl.run_state(pv)(plgpu.ACC.init(acc))  # waits for the wgmma on exit
        p_smem.at[wg][...] = p
        plgpu.commit_smem()

        def pv_only(acc_ref):
            plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem.at[slot])
            return acc_ref[...]

        return acc + pl.run_scoped(pv_only, plgpu.ACC((WG_ROWS, cfg.head_dim), jnp.float32))

    def mask(s, step) -> jax.Array:
        start = step * block_k
        load_start = _load_start(cfg, step)
        row, col = _iota(cfg, s.shape, 0), _iota(cfg, s.shape, 1)
        # Row r (token first_token + r // G) sees slot j iff j - first_pos <= r // G, i.e. iff
        # G * (j - first_pos) <= r: no integer division needed.
        slot_minus_pos = col + (load_start - first_pos)
        s = jnp.where(row >= (slot_minus_pos * group if group > 1 else slot_minus_pos), s, MASK_VALUE)
        if cfg.padded_slots % block_k:  # a clamped last tile repeats slots an earlier tile covered
            s = jnp.where(col >= start - load_start, s, MASK_VALUE)
        if cfg.padded_slots > cfg.num_slots:  # padded cache: the padding is never visible
            s = jnp.where(col < cfg.num_slots - load_start, s, MASK_VALUE)
        return s

    def step(j, carry, masked: bool):
        acc, m, l = carry
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(k_ready.at[slot])
        s = scores(slot)
        plgpu.barrier_arrive(k_free.at[slot])
        if masked:
            s = mask(s, j)
        # m is kept in the scaled (base-2) domain, so p = exp2(s * qk_scale - m) is one FMA + exp2.
        m_new = jnp.maximum(m, s.max(axis=1) * qk_scale)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_ready.at[slot])
        acc = accumulate_pv(acc, p.astype(cfg.dtype), slot)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

    def skip(j, carry):
        # Tiles the block needs for another warpgroup's rows: release them without computing.
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        return carry

    carry = (
        _layout(cfg, jnp.zeros((WG_ROWS, cfg.head_dim), jnp.float32), plgpu.Layout.WGMMA),
        _layout(cfg, jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
        _layout(cfg, jnp.zeros((WG_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
    )
    plgpu.barrier_wait(q_ready)
    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    acc, _, l = lax.fori_loop(num_full, my_steps, functools.partial(step, masked=True), carry)
    lax.fori_loop(my_steps, num_steps, skip, None)

    # The Q tile is dead: reuse its SMEM to stage the output for one TMA store.
    q_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(cfg.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_gmem.at[rows])
    plgpu.wait_smem_to_gmem(0)


def _resolve_interpret(interpret: bool | InterpretGPUParams | None) -> InterpretGPUParams | None:
    """None/False -> compile (None: only on a GPU backend); True or params -> GPU interpret mode."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if interpret is False:
        return None
    if InterpretGPUParams is None:
        raise ValueError(
            f"Mosaic GPU interpret mode needs jax >= 0.10 (installed: {jax.__version__}); "
            "run on a GPU backend or pass interpret=False"
        )
    return InterpretGPUParams() if interpret is True else interpret


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, block_q: int, block_k: int, num_stages: int) -> None:
    batch, _, num_heads, head_dim = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k, v must be (B, S, K, D) matching q {q.shape}, got {k.shape} and {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (jnp.float32, *SUPPORTED_DTYPES):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {q.dtype}")
    kv_heads = k.shape[2]
    if num_heads % kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({kv_heads})")
    group = num_heads // kv_heads
    if WG_ROWS % group:
        raise ValueError(f"the group size H // K = {group} must divide {WG_ROWS} (rows per warpgroup)")
    if head_dim % (SWIZZLE_BYTES // 2) or head_dim > 256:
        raise ValueError(f"head_dim must be a multiple of 64 and <= 256 (TMA swizzle, wgmma N), got {head_dim}")
    if block_q not in (64, 128):
        raise ValueError(f"block_q (rows: tokens x group heads) must be 64 or 128, got {block_q}")
    if block_k % 64 or not 64 <= block_k <= 256:
        raise ValueError(f"block_k must be 64, 128, 192 or 256, got {block_k}")
    if num_stages < 2:
        raise ValueError(f"num_stages must be >= 2, got {num_stages}")
    # Tiles, plus Mosaic GPU's default 2 KiB reduction scratch and room for the barriers.
    smem = (block_q + 2 * num_stages * block_k) * head_dim * 2 + 3 * 1024
    if smem > SMEM_BYTES:
        raise ValueError(
            f"tiles need {smem} bytes of shared memory (Q {block_q}x{head_dim}, {num_stages} stages of K and V "
            f"{block_k}x{head_dim}), over the {SMEM_BYTES} of an H100: lower block_k or num_stages"
        )


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "num_stages", "interpret"))
def flash_attention_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    offsets: jax.Array,
    *,
    block_q: int = 128,
    block_k: int = 128,
    num_stages: int = 2,
    interpret: bool | InterpretGPUParams | None = None,
) -> jax.Array:
    """Causal GQA flash attention of T new queries per sequence over a KV cache (Hopper, Mosaic GPU).

    Args:
      q: (B, T, H, D) queries, rotary applied; query t of sequence b is at position offsets[b] + t.
      k, v: (B, S, K, D) the cache (H a multiple of K, H // K dividing 64); slot j holds position j.
      offsets: (B,) int32 position of each sequence's first query.
      block_q: query rows per block, 64 or 128 (tokens x the G = H // K heads of a KV head); one
        compute warpgroup per 64 rows. Shrunk to 64 when T * G <= 64.
      block_k: cache slots per key tile, a multiple of 64 up to 256.
      num_stages: K/V tiles in flight (SMEM ring depth), >= 2.
      interpret: None compiles on a GPU backend and uses Mosaic GPU interpret mode elsewhere; True /
        False force either; an `InterpretGPUParams` instance is passed to the interpreter.

    D must be a multiple of 64 (at most 256). Any T and S: q is padded to whole blocks in the
    wrapper (the padding is sliced off). The cache is read in place when S is a multiple of 8 and
    S >= block_k; otherwise the wrapper pads K/V up to that (a copy of the cache; the padding is
    masked), because TMA into 8-row swizzled SMEM tiles needs whole tiles in GMEM. wgmma takes
    16-bit operands, so float32 inputs are computed in bfloat16 (scores, softmax and accumulation
    stay float32) and the result is cast back to float32.

    Returns:
      (B, T, H, D) in q.dtype.
    """
    _check_shapes(q, k, v, block_q, block_k, num_stages)
    batch, num_tokens, num_heads, head_dim = q.shape
    num_slots, kv_heads = k.shape[1], k.shape[2]
    group = num_heads // kv_heads
    out_dtype = q.dtype
    if q.dtype == jnp.float32:
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    if block_q > WG_ROWS and num_tokens * group <= WG_ROWS:
        block_q = WG_ROWS  # a second compute warpgroup would only see padding
    # TMA into tiled SMEM needs whole 8-row tiles in GMEM too; a cache smaller than one key tile is
    # padded to one tile. Both copy K/V (the padding is masked); common cache sizes need neither.
    padded_slots = max(pl.cdiv(num_slots, TILE_ROWS) * TILE_ROWS, block_k)
    if padded_slots > num_slots:
        pad = ((0, 0), (0, padded_slots - num_slots), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)

    cfg = _Config(
        group=group,
        num_tokens=num_tokens,
        num_slots=num_slots,
        padded_slots=padded_slots,
        head_dim=head_dim,
        dtype=q.dtype,
        block_q=block_q,
        block_k=block_k,
        num_stages=num_stages,
        interpreting=_resolve_interpret(interpret) is not None,
    )
    padded_tokens = cfg.num_q_tiles * cfg.tokens_per_tile
    # (B, T, K*G, D) -> (B, K, T_pad * G, D): a block's rows are one contiguous 2-D TMA box.
    q_rows = jnp.pad(q, ((0, 0), (0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    q_rows = q_rows.reshape(batch, padded_tokens, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(batch, kv_heads, padded_tokens * group, head_dim)

    out = plgpu.kernel(
        functools.partial(_kernel, cfg=cfg),
        out_type=out_struct(q_rows.shape, q_rows.dtype, q_rows),
        grid=(cfg.num_q_tiles, kv_heads, batch),
        grid_names=("q_tile", "kv_head", "batch"),
        num_threads=cfg.num_compute + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_resolve_interpret(interpret),
    )(offsets.astype(jnp.int32), q_rows, k, v)

    out = out.reshape(batch, kv_heads, padded_tokens, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = out.reshape(batch, padded_tokens, num_heads, head_dim)[:, :num_tokens]
    return out.astype(out_dtype)
