"""The Llama 3 model: a Flax NNX module over stacked layers, and the pure forward it runs.

Axis letters in shapes: B batch, T tokens, S cache slots, D model dim, H query heads,
K kv heads, G = H // K, Dh head dim, F MLP width, V vocabulary, L layers.

Every weight carries logical axis names (`logical_axes` metadata, and `LOGICAL_AXES` below);
sharding maps those names to mesh axes in one table (llama_jax/sharding.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import AttentionImpl, attention, block_decode_attention
from .config import LlamaConfig
from .linear import weight_einsum
from .quantization import dequantize_kv, quantize_kv
from .rope import apply_rope, rope_tables

Params = dict[str, Any]

# Logical axes of every parameter (layer weights carry a leading "layers" axis).
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "norm": ("norm",),
    "lm_head": ("embed", "vocab"),
    "attn_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "q_heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "wo": ("layers", "q_heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "norm"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}
CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")
LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def param_shapes(config: LlamaConfig) -> Params:
    """Shapes of all parameters, in the nested layout of `Llama.params()`."""
    c = config
    d, h, k, dh, f, l = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.n_layers
    shapes: Params = {
        "embed": (c.vocab_size, d),
        "norm": (d,),
        "layers": {
            "attn_norm": (l, d),
            "wq": (l, d, h, dh),
            "wk": (l, d, k, dh),
            "wv": (l, d, k, dh),
            "wo": (l, h, dh, d),
            "mlp_norm": (l, d),
            "w_gate": (l, d, f),
            "w_up": (l, d, f),
            "w_down": (l, f, d),
        },
    }
    if not c.tie_embeddings:
        shapes["lm_head"] = (d, c.vocab_size)
    return shapes


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of all layers: (L, B, S, K, Dh) each. Slot j holds position j.

    An int8 cache (`zeros(..., dtype=jnp.int8)`) also holds float32 scales (L, B, S, K), one per
    token and head: key = k * k_scale[..., None]."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @classmethod
    def zeros(cls, config: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> "KVCache":
        shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
        if jnp.dtype(dtype) == jnp.int8:
            k, v = jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8)
            return cls(k, v, jnp.zeros(shape[:-1], jnp.float32), jnp.zeros(shape[:-1], jnp.float32))
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


class KVBlocks(NamedTuple):
    """A ragged list of N cache blocks for decode attention: block n is slots starts[n] ..
    starts[n] + size - 1 of batch row rows[n] (rows[n] == B: padding). `size` is static and
    divides the cache length; starts are multiples of it."""

    rows: jax.Array
    starts: jax.Array
    size: int


def dense(equation: str, x: jax.Array, w: Any, *, out_dtype: Any = None) -> jax.Array:
    """x times a weight, in `out_dtype` (default: x's dtype). A weight is an array, or an object
    with a `dense(equation, x, out_dtype)` method (quantized weights, LoRA-adapted weights) that
    computes the same product its own way."""
    if isinstance(w, jax.Array):
        return weight_einsum(equation, x, w, preferred_element_type=out_dtype)
    return w.dense(equation, x, out_dtype=out_dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight


def _layer(
    config: LlamaConfig,
    impl: AttentionImpl,
    x: jax.Array,
    p: Params,
    cache: KVCache | None,
    layer: jax.Array,
    positions: jax.Array,
    rows: jax.Array | None,
    kv_window: int | None,
    kv_blocks: KVBlocks | None,
    cos: jax.Array,
    sin: jax.Array,
) -> tuple[jax.Array, KVCache | None]:
    """One transformer block. Writes this step's keys/values into rows `rows` (None: row b of the
    batch is cache row b) of the stacked cache (L, B_cache, S, K, Dh) at `layer` and attends over
    the first `kv_window` slots, or over `kv_blocks`. Without a cache (None), it attends over this
    step's tokens."""
    h = rms_norm(x, p["attn_norm"], config.norm_eps)
    q = apply_rope(dense("btd,dnh->btnh", h, p["wq"]), cos, sin)
    k = apply_rope(dense("btd,dkh->btkh", h, p["wk"]), cos, sin)
    v = dense("btd,dkh->btkh", h, p["wv"])
    if cache is None:  # no cache (training): token t of the row holds position t
        k_seen, v_seen = k, v
    else:
        cache, k_seen, v_seen = _update_cache(cache, k, v, layer, positions, rows, kv_window, kv_blocks, q.dtype)
    if kv_blocks is None:
        attn = attention(q, k_seen, v_seen, positions, impl)
    else:
        attn = block_decode_attention(q, k_seen, v_seen, positions, kv_blocks.rows, kv_blocks.starts)
    x = x + dense("btnh,nhd->btd", attn, p["wo"])
    h = rms_norm(x, p["mlp_norm"], config.norm_eps)
    gate = dense("btd,df->btf", h, p["w_gate"])
    up = dense("btd,df->btf", h, p["w_up"])
    x = x + dense("btf,fd->btd", jax.nn.silu(gate) * up, p["w_down"])
    return x, cache


def _scatter_rowwise(cache: jax.Array, positions: jax.Array, updates: jax.Array, *, layer: jax.Array) -> jax.Array:
    """cache[layer, b, positions[b, t]] = updates[b, t] for (L, B, S, ...) `cache`, (B, T) positions
    and (B, T, ...) updates; positions past the cache are dropped."""
    trailing = tuple(range(2, updates.ndim))
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=trailing,
        inserted_window_dims=(0, 2),
        scatter_dims_to_operand_dims=(0, 2),
        operand_batching_dims=(1,),
        scatter_indices_batching_dims=(0,),
    )
    index = jnp.stack([jnp.broadcast_to(layer, positions.shape).astype(positions.dtype), positions], axis=-1)
    return jax.lax.scatter(cache, index, updates, dnums, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def _update_cache(
    cache: KVCache, k: jax.Array, v: jax.Array, layer: jax.Array, positions: jax.Array, rows: jax.Array | None,
    kv_window: int | None, kv_blocks: KVBlocks | None, dtype: Any,
) -> tuple[KVCache, jax.Array, jax.Array]:
    """Scatters this step's keys and values to their slots (positions past the cache, padding, are
    dropped) and reads back, in `dtype`, the layer's first `kv_window` slots of the rows, or the
    blocks `kv_blocks` as (N, size, ...)."""
    # One scatter into the stacked cache, updated in place.
    if rows is None:
        # Row b is cache row b: the batch is a scatter batching dimension, so the update stays
        # local when the batch is sharded. (A jax.vmap of `.at[].set` would move the batch axis
        # first, transposing the whole stacked cache at every layer.)
        write = functools.partial(_scatter_rowwise, layer=layer)
    else:
        write = lambda c, p, u: c.at[layer, rows[:, None], p].set(u, mode="drop")  # noqa: E731
    if kv_blocks is None:
        picked = slice(None) if rows is None else rows
        read = lambda c: c[layer, picked, :kv_window]  # noqa: E731
    else:
        size = kv_blocks.size
        block_rows = jnp.minimum(kv_blocks.rows, positions.shape[0] - 1)  # padding blocks read some row
        if rows is not None:
            block_rows = rows[block_rows]

        def read(c: jax.Array) -> jax.Array:  # a reshape of the cache, then one gather of whole blocks
            tiled = c.reshape(c.shape[:2] + (c.shape[2] // size, size) + c.shape[3:])
            return tiled[layer, block_rows, kv_blocks.starts // size]
    if cache.k_scale is None:
        k_all = write(cache.k, positions, k.astype(cache.k.dtype))
        v_all = write(cache.v, positions, v.astype(cache.v.dtype))
        return KVCache(k_all, v_all), read(k_all).astype(dtype), read(v_all).astype(dtype)
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)  # int8 cache: one scale per token and head
    cache = KVCache(*(write(c, positions, u) for c, u in
                      ((cache.k, kq), (cache.v, vq), (cache.k_scale, ks), (cache.v_scale, vs))))
    k_seen = dequantize_kv(read(cache.k), read(cache.k_scale), dtype)
    return cache, k_seen, dequantize_kv(read(cache.v), read(cache.v_scale), dtype)


def _cache_access(
    tokens: jax.Array, cache: KVCache | None, cache_rows: jax.Array | None, kv_window: int | None,
    kv_blocks: KVBlocks | None,
) -> tuple[jax.Array | None, int | None]:
    """The cache rows of the input rows (None: row b is cache row b) and the window attention reads,
    for `forward`'s arguments; checks that `kv_blocks` fits the cache and the input."""
    if kv_blocks is not None and (cache is None or tokens.shape[1] != 1 or cache.max_len % kv_blocks.size):
        raise ValueError("kv_blocks needs a cache whose length is a multiple of the block size, and one token per row")
    if cache is None:
        return cache_rows, None
    rows = cache_rows
    if rows is None and tokens.shape[0] != cache.k.shape[1]:
        rows = jnp.arange(tokens.shape[0])
    return rows, cache.max_len if kv_window is None else min(kv_window, cache.max_len)


def forward(
    params: Params,
    config: LlamaConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache | None,
    *,
    logits_at: jax.Array | None = None,
    cache_rows: jax.Array | None = None,
    kv_window: int | None = None,
    kv_blocks: KVBlocks | None = None,
    attention_impl: AttentionImpl = "xla",
    remat: bool = False,
) -> tuple[jax.Array, KVCache | None]:
    """Run the model on new tokens (B, T) at absolute `positions` (B, T) against `cache`.

    Prefill (T > 1) and decode (T = 1) share this path. Row b of the input uses cache row
    `cache_rows[b]` (default: row b) and attends over its first `kv_window` slots (default:
    all; a static int), or, in decode (T = 1), over its blocks in `kv_blocks` (jnp attention
    whatever `attention_impl`). Returns float32 logits (B, T, V), or (B, V) at the token index
    `logits_at` (B,) of each row, and the updated cache. `remat` recomputes each layer's
    activations in the backward pass instead of storing them (training). Without a cache
    (None; training), row b attends over its own tokens, token t being at position t, and no
    cache is returned: a cache in the scanned carry would be saved once per layer by `remat`.
    """
    x = jnp.take(params["embed"], tokens, axis=0)  # (B, T, D)
    cos, sin = rope_tables(config, positions)
    rows, window = _cache_access(tokens, cache, cache_rows, kv_window, kv_blocks)

    def step(carry, layer):
        x, cache = carry
        p, i = layer
        return _layer(config, attention_impl, x, p, cache, i, positions, rows, window, kv_blocks, cos, sin), None

    if remat:
        step = jax.checkpoint(step)
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):  # one weight array per layer: unrolled, no slicing
        for i, p in enumerate(layers):
            (x, cache), _ = step((x, cache), (p, jnp.int32(i)))
    else:
        (x, cache), _ = jax.lax.scan(step, (x, cache), (layers, jnp.arange(config.n_layers)))

    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]  # (B, D)
    x = rms_norm(x, params["norm"], config.norm_eps)
    if config.tie_embeddings:  # contract against the (V, D) table as stored; a transpose costs a copy on CPU
        logits = jnp.einsum("...d,vd->...v", x, params["embed"], preferred_element_type=jnp.float32)
    else:
        rows = "bt"[: x.ndim - 1]  # (B, D) at `logits_at`, else (B, T, D); the head may be quantized
        logits = dense(f"{rows}d,dv->{rows}v", x, params["lm_head"], out_dtype=jnp.float32)
    return logits, cache


# ---- decode with the residual stream feature-major, for XLA's CPU backend ----
# At a few rows, XLA CPU streams a weight from memory much faster as W (out, in) times the
# activations as columns (in, B) than as rows (B, in) times W (in, out): a decode step's weight
# products alone ran 1.3x faster at batch 8 on the demo model (README, "What we found"). So on
# CPU the engine decodes with (out, in) copies of the weights and the residual stream as (D, B).
# XLA folds a transpose next to a dot into the dot (turning it back into rows times W), so the
# few transposes to and from attention's (B, ..., Dh) layout sit behind optimization barriers.


def feature_major_problem(params: Params) -> str | None:
    """Why `feature_major_params` cannot take these parameters, or None when it can."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return "feature-major decode needs one weight tree per layer (load(scan_layers=False))"
    weights = [w for p in layers for w in p.values()] + [params["embed"], params.get("lm_head", params["embed"])]
    if not all(isinstance(w, jax.Array) for w in weights):  # quantized and LoRA weights are objects
        return "feature-major decode needs plain weight arrays (not quantized or LoRA-adapted weights)"
    return None


def feature_major_params(params: Params) -> Params:
    """(out, in) 2-D copies of the per-layer weights and the LM head, for `decode_feature_major`.
    Needs plain arrays with one tree per layer (the layout `load` gives by default)."""
    problem = feature_major_problem(params)
    if problem:
        raise ValueError(problem)
    layers = params["layers"]

    def out_in(w: jax.Array, n_in: int) -> jax.Array:  # contracted axes first -> (out, in), a copy
        return w.reshape(math.prod(w.shape[:n_in]), -1).T

    contracted = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
    out: Params = {"embed": params["embed"], "norm": params["norm"]}
    if "lm_head" in params:
        out["lm_head"] = out_in(params["lm_head"], 1)
    out["layers"] = tuple(
        {k: out_in(w, contracted[k]) if k in contracted else w for k, w in p.items()} for p in layers
    )
    return out


def _rms_norm_columns(h: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`rms_norm` of the columns of h (D, B)."""
    h32 = h.astype(jnp.float32)
    normed = h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, axis=0, keepdims=True) + eps)
    return normed.astype(h.dtype) * weight[:, None]


def decode_feature_major(
    params: Params,
    config: LlamaConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    *,
    cache_rows: jax.Array | None = None,
    kv_window: int | None = None,
    kv_blocks: KVBlocks | None = None,
) -> tuple[jax.Array, KVCache]:
    """`forward` for one new token per row (tokens, positions (B, 1)) with `feature_major_params`:
    the same cache, attention and results, float32 logits (B, V)."""
    c = config
    b = tokens.shape[0]
    barrier = jax.lax.optimization_barrier
    h = jnp.take(params["embed"], tokens[:, 0], axis=0).T  # (D, B)
    cos, sin = rope_tables(config, positions)
    rows, window = _cache_access(tokens, cache, cache_rows, kv_window, kv_blocks)

    def heads(w: jax.Array, x: jax.Array, n: int) -> jax.Array:  # (B, 1, n, Dh)
        return barrier(w @ x).T.reshape(b, 1, n, c.head_dim)

    for i, p in enumerate(params["layers"]):
        x = _rms_norm_columns(h, p["attn_norm"], c.norm_eps)
        q = apply_rope(heads(p["wq"], x, c.n_heads), cos, sin)
        k = apply_rope(heads(p["wk"], x, c.n_kv_heads), cos, sin)
        v = heads(p["wv"], x, c.n_kv_heads)
        cache, k_seen, v_seen = _update_cache(cache, k, v, jnp.int32(i), positions, rows, window, kv_blocks, q.dtype)
        if kv_blocks is None:
            attn = attention(q, k_seen, v_seen, positions)
        else:
            attn = block_decode_attention(q, k_seen, v_seen, positions, kv_blocks.rows, kv_blocks.starts)
        h = h + p["wo"] @ barrier(attn.reshape(b, -1).T)
        x = _rms_norm_columns(h, p["mlp_norm"], c.norm_eps)
        h = h + p["w_down"] @ (jax.nn.silu(p["w_gate"] @ x) * (p["w_up"] @ x))
    h = _rms_norm_columns(h, params["norm"], c.norm_eps)
    head = params["embed"] if c.tie_embeddings else params["lm_head"]  # (V, D) either way
    logits = jnp.dot(head, h, preferred_element_type=jnp.float32)  # (V, B)
    return barrier(logits).T, cache


def layer_sharding(sharding: Any) -> Any:
    """The sharding of one layer, given the sharding of the stacked (L, ...) array."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise TypeError(f"unsupported sharding type {type(sharding).__name__}; use NamedSharding or SingleDeviceSharding")


def _take_layer(a: jax.Array, i: jax.Array) -> jax.Array:
    return a[i]


def unstack_layers(layers: Any, n_layers: int) -> tuple:
    """Stacked layer weights (a tree of (L, ...) arrays, quantized or LoRA weights included) as a
    tuple of `n_layers` per-layer trees, each array keeping its sharding less the layer axis."""
    leaves, treedef = jax.tree.flatten(layers)
    columns = []
    for leaf in leaves:  # one traced function for all leaves; only the output sharding differs
        take = jax.jit(_take_layer, out_shardings=layer_sharding(leaf.sharding))
        columns.append([take(leaf, i) for i in range(n_layers)])
    return tuple(treedef.unflatten([c[i] for c in columns]) for i in range(n_layers))


class Llama(nnx.Module):
    """Llama 3 with layers stacked on a leading axis (run with `lax.scan`)."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.bfloat16,
        attention_impl: AttentionImpl = "xla",
    ):
        self.config = config
        self.attention_impl = attention_impl
        shapes = param_shapes(config)

        def make(name: str, shape: tuple[int, ...]) -> nnx.Param:
            if name.endswith("norm"):  # norms near 1, randomised so tests see them
                value = 1.0 + 0.1 * jax.random.normal(rngs.params(), shape, jnp.float32)
            else:
                value = jax.random.normal(rngs.params(), shape, jnp.float32) * _fan_in(name, config) ** -0.5
            return nnx.Param(value.astype(dtype), logical_axes=LOGICAL_AXES[name])

        self.embed = make("embed", shapes["embed"])
        self.norm = make("norm", shapes["norm"])
        if "lm_head" in shapes:
            self.lm_head = make("lm_head", shapes["lm_head"])
        self.layers = nnx.Dict({name: make(name, shape) for name, shape in shapes["layers"].items()})

    def params(self) -> Params:
        """The parameters as a plain nested dict of arrays (the input of `forward`)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *, logits_at: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        return forward(
            self.params(), self.config, tokens, positions, cache, logits_at=logits_at,
            attention_impl=self.attention_impl,
        )


def _fan_in(name: str, config: LlamaConfig) -> int:
    if name == "embed":
        return 1
    if name == "wo":
        return config.n_heads * config.head_dim
    if name == "w_down":
        return config.ffn_dim
    return config.dim
