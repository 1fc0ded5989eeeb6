import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.attention import attention_reference, block_decode_attention
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.linear import weight_einsum
from llama_jax.model import LOGICAL_AXES, KVBlocks, KVCache, Llama, forward, param_shapes, unstack_layers
from llama_jax.quantization import quantize_params
from llama_jax.rope import inv_frequencies


def test_rope_scaling_matches_meta_reference():
    torch = pytest.importorskip("torch")
    from llama_models.llama3.model import apply_scaling

    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2)[:64].float() / 128))
    ours = inv_frequencies(128, 500000.0, RopeScaling())
    np.testing.assert_allclose(ours, apply_scaling(base).numpy(), rtol=1e-6)


@pytest.mark.parametrize("factor, theta, head_dim", [(8.0, 500000.0, 128), (32.0, 500000.0, 64), (4.0, 10000.0, 32)])
def test_rope_scaling_matches_transformers(factor, theta, head_dim):
    pytest.importorskip("torch")
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=theta,
                                   rope_scaling=scaling, max_position_embeddings=131072)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = inv_frequencies(head_dim, theta, RopeScaling(factor=factor))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)


def _naive_attention(q, k, v, q_positions):
    """float64 attention with K/V repeated over each group, for comparison."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    mask = np.arange(k.shape[1])[None, None, None, :] <= np.asarray(q_positions)[:, None, :, None]
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4), (6, 1)])
def test_gqa_attention_reference(heads, kv_heads):
    rng = np.random.default_rng(0)
    b, t, s, d = 3, 5, 19, 16
    q = rng.standard_normal((b, t, heads, d), np.float32)
    k = rng.standard_normal((b, s, kv_heads, d), np.float32)
    v = rng.standard_normal((b, s, kv_heads, d), np.float32)
    offsets = np.array([0, 7, 14])
    pos = offsets[:, None] + np.arange(t)[None]
    out = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos, jnp.int32))
    np.testing.assert_allclose(np.asarray(out), _naive_attention(q, k, v, pos), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_block_decode_attention_equals_the_reference(dtype, tol):
    """Ragged blocks (rows holding 1 to 4 blocks, listed out of order, padding blocks, a row with
    none) give each row's attention over its own slots 0..position."""
    rng = np.random.default_rng(5)
    b, s, size, heads, kv_heads, d = 4, 64, 16, 6, 2, 8
    q = rng.standard_normal((b, 1, heads, d), np.float32)
    k = rng.standard_normal((b, s, kv_heads, d), np.float32)
    v = rng.standard_normal((b, s, kv_heads, d), np.float32)
    pos = np.array([[0], [40], [17], [63]], np.int32)
    pairs = [(row, start) for row in (1, 0, 3) for start in range(0, int(pos[row, 0]) + 1, size)]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))] + [(b, 0)] * 3  # row 2 gets no block
    rows, starts = (np.array(c, np.int32) for c in zip(*pairs))
    blocks = lambda a: np.stack([a[r if r < b else 0, t : t + size] for r, t in pairs])  # noqa: E731
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    got = block_decode_attention(cast(q), cast(blocks(k)), cast(blocks(v)), jnp.asarray(pos), jnp.asarray(rows),
                                 jnp.asarray(starts))
    assert got.dtype == dtype and got.shape == q.shape
    want = _naive_attention(np.asarray(cast(q), np.float32), np.asarray(cast(k), np.float32),
                            np.asarray(cast(v), np.float32), pos)
    got = np.asarray(got, np.float32)
    for row in (0, 1, 3):
        np.testing.assert_allclose(got[row], want[row], rtol=tol, atol=tol)
    assert not got[2].any()


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.int8])
def test_decode_over_blocks_equals_the_dense_window(cache_dtype):
    """forward with kv_blocks (each row its own blocks, cache rows given or not) gives the logits
    and cache of the dense window, float32 and int8 caches."""
    config, params = _tiny()
    rng = np.random.default_rng(6)
    lengths = np.array([3, 50, 17])
    cache = KVCache.zeros(config, 4, 64, cache_dtype)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, 50)), jnp.int32)
    idx = np.arange(50)[None]
    positions = jnp.asarray(np.where(idx < lengths[:, None], idx, 65), jnp.int32)  # padding parked past the cache
    _, cache = forward(params, config, tokens, positions, cache, cache_rows=jnp.arange(3))
    step = jnp.asarray(rng.integers(0, config.vocab_size, (3, 1)), jnp.int32)
    at = jnp.asarray(lengths[:, None], jnp.int32)
    pairs = [(r, t) for r in range(3) for t in range(0, int(lengths[r]) + 1, 16)] + [(3, 0)] * 2
    blocks = KVBlocks(*(jnp.asarray(c, jnp.int32) for c in zip(*pairs)), 16)
    for rows in (None, jnp.arange(3)):
        c = cache if rows is not None else jax.tree.map(lambda a: a[:, :3], cache)
        want, want_cache = forward(params, config, step, at, c, cache_rows=rows, kv_window=64)
        got, got_cache = forward(params, config, step, at, c, cache_rows=rows, kv_blocks=blocks)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):  # later layers see attention
            quantum = 1 if a.dtype == jnp.int8 else 1e-5  # a rounding may land one step over
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=quantum)
    with pytest.raises(ValueError, match="multiple of the block size"):
        forward(params, config, step, at, cache, kv_blocks=KVBlocks(blocks.rows, blocks.starts, 24))
    with pytest.raises(ValueError, match="one token per row"):
        forward(params, config, tokens, positions, cache, kv_blocks=blocks)


def _tiny(preset="tiny", dtype=jnp.float32):
    config = LlamaConfig.from_preset(preset)
    return config, Llama(config, rngs=nnx.Rngs(0), dtype=dtype).params()


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha-tied"])
def test_cached_decode_equals_full_recompute(preset):
    config, params = _tiny(preset)
    rng = np.random.default_rng(1)
    b, t = 2, 12
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    full, _ = forward(params, config, tokens, positions, KVCache.zeros(config, b, 32, jnp.float32))
    step = jax.jit(lambda p, tok, pos, c: forward(p, config, tok, pos, c))
    cache = KVCache.zeros(config, b, 32, jnp.float32)
    got, cache = step(params, tokens[:, :5], positions[:, :5], cache)
    pieces = [got]
    for i in range(5, t):
        logits, cache = step(params, tokens[:, i : i + 1], positions[:, i : i + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_unrolled_layers_equal_the_scan(quantize):
    """One array per layer (Python loop) gives the scan's logits and cache, prefill and decode."""
    config, params = _tiny("tiny-8kv")
    if quantize:
        params = quantize_params(params, quantize)
    unrolled = {**params, "layers": unstack_layers(params["layers"], config.n_layers)}
    assert len(unrolled["layers"]) == config.n_layers
    np.testing.assert_array_equal(
        jax.tree.leaves(unrolled["layers"][1])[0], jax.tree.leaves(params["layers"])[0][1]
    )
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 7)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    results = []
    for p in (params, unrolled):
        cache = KVCache.zeros(config, 2, 16, jnp.float32)
        prefill, cache = forward(p, config, tokens[:, :6], positions[:, :6], cache)
        step, cache = forward(p, config, tokens[:, 6:], positions[:, 6:], cache, logits_at=jnp.zeros(2, jnp.int32))
        results.append((prefill, step, cache.k, cache.v))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation, x_shape, w_shape", [
    ("btd,dnh->btnh", (2, 3, 8), (8, 4, 5)),
    ("btnh,nhd->btd", (2, 3, 4, 5), (4, 5, 8)),
    ("btf,fd->btd", (1, 1, 6), (6, 8)),
    ("...d,vd->...v", (2, 8), (11, 8)),  # not weight-first: plain einsum
    ("btd,dnh->bnth", (2, 3, 8), (8, 4, 5)),  # output reordered: plain einsum
])
def test_weight_einsum_equals_einsum(equation, x_shape, w_shape):
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal(x_shape, np.float32), rng.standard_normal(w_shape, np.float32)
    want = np.einsum(equation, x.astype(np.float64), w.astype(np.float64))
    got = weight_einsum(equation, jnp.asarray(x), jnp.asarray(w), preferred_element_type=jnp.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rows_windows_and_logits_at():
    """Cache rows, a kv window and last-token logits give the same numbers as the plain call."""
    config, params = _tiny()
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 9)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    full, _ = forward(params, config, tokens, positions, KVCache.zeros(config, 2, 64, jnp.float32))
    cache = KVCache.zeros(config, 5, 64, jnp.float32)
    last, cache = forward(params, config, tokens, positions, cache, logits_at=jnp.array([8, 3]),
                          cache_rows=jnp.array([4, 1]), kv_window=16)
    np.testing.assert_allclose(last[0], full[0, 8], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last[1], full[1, 3], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(cache.k[:, 0]).max()) == 0.0  # untouched rows stay untouched
    assert float(jnp.abs(cache.k[:, 4, :9]).max()) > 0.0


def test_bfloat16_stays_close_to_float32():
    config, params32 = _tiny()
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params32)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (1, 16)), jnp.int32)
    positions = jnp.arange(16, dtype=jnp.int32)[None]
    l32, _ = forward(params32, config, tokens, positions, KVCache.zeros(config, 1, 16, jnp.float32))
    l16, _ = forward(params16, config, tokens, positions, KVCache.zeros(config, 1, 16, jnp.bfloat16))
    assert l16.dtype == jnp.float32
    err = float(jnp.abs(l16 - l32).max() / jnp.abs(l32).max())
    assert err < 0.05


def test_every_parameter_carries_logical_axes():
    config = LlamaConfig.from_preset("tiny")
    model = Llama(config, rngs=nnx.Rngs(0), dtype=jnp.float32)
    shapes = param_shapes(config)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param),
                                                              is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}
    assert len(flat) == len(jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
    for path, var in flat.items():
        name = path.split("/")[-1]
        assert var.get_metadata()["logical_axes"] == LOGICAL_AXES[name]
        assert len(LOGICAL_AXES[name]) == var[...].ndim


def _compiled_program(n_layers: int) -> str:
    config = LlamaConfig.from_preset("tiny").replace(n_layers=n_layers)
    abstract = jax.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=jnp.float32).params())
    cache = jax.eval_shape(lambda: KVCache.zeros(config, 1, 64, jnp.float32))
    tok = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    fn = jax.jit(lambda p, t, pos, c: forward(p, config, t, pos, c))
    return fn.lower(abstract, tok, tok, cache).compile().as_text()


def test_compile_time_does_not_grow_with_depth():
    """Stacked layers run under a scan: the compiled program of 32 layers is the one of 4 (one
    loop body), so compile time does not grow with depth. (Checked on the program, not by timing
    it: a compile takes ~0.1 s here, within a busy machine's noise.)"""
    shallow, deep = _compiled_program(4), _compiled_program(32)
    assert "while" in deep
    count = lambda text: len([line for line in text.splitlines() if " = " in line])  # noqa: E731
    assert count(deep) == count(shallow), (count(shallow), count(deep))
