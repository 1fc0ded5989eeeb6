"""Memory planner: per-device bytes of weights, KV cache and temporaries for a model on a mesh.

Nothing is allocated: the decode step is compiled ahead of time on abstract shapes
(`jax.ShapeDtypeStruct` carrying the shardings of `llama_jax.sharding`), and the compiler's
`memory_analysis()` gives exact argument and output sizes. Planning for devices you do not
have needs that many (simulated CPU) devices in this process: `scripts/plan.py` sets that up.

The CPU backend computes bf16 matrix products in float32 and hoists the conversions, so its
temporary-buffer figure overstates what a GPU needs; beside it the plan gives an analytic
estimate of the largest buffers a GPU keeps live in one decode step and in one prefill chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from .config import LlamaConfig
from .model import KVCache, forward, param_shapes
from .quantization import QuantizedWeight, param_shardings, quantize_params
from .sharding import ModelShardings, make_mesh, parse_mesh_spec

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int) -> int:
    """"80GB" -> 80e9 (SI), "80GiB" -> 80 * 2**30, plain numbers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m[2].upper() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size (examples: 80GB, 141GB, 80GiB, 8e10)")
    return int(float(m[1]) * _UNITS[m[2].upper()])


def devices_needed(mesh: str) -> int:
    return math.prod(parse_mesh_spec(mesh).values())


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device. `compiled_*` come from the compiler; `gpu_temp_*` are analytic."""

    model: str
    mesh: str
    dtype: str
    quantize: str | None
    quantize_lm_head: bool
    cache_dtype: str
    max_seq_len: int
    batch: int
    attention: str
    prefill_chunk: int
    weights: int  # exact, from the shard shapes
    kv_cache: int  # exact, from the shard shapes
    compiled_arguments: int | None  # weights + cache + tokens, as the compiled decode step sees them
    compiled_outputs: int | None
    compiled_aliased: int | None  # outputs that reuse donated inputs (the cache)
    compiled_temp: int | None
    compiled_on: str | None  # platform of the compiled step ("cpu": temp overstated, see module doc)
    gpu_temp_decode: int
    gpu_temp_prefill: int
    device_memory: int | None
    usable_fraction: float

    @property
    def total(self) -> int:
        """Weights + KV cache + the larger of the decode and prefill temporaries (GPU estimate)."""
        return self.weights + self.kv_cache + max(self.gpu_temp_decode, self.gpu_temp_prefill)

    @property
    def fits(self) -> bool | None:
        if self.device_memory is None:
            return None
        return self.total <= self.device_memory * self.usable_fraction

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total, "fits": self.fits}

    def _quantized(self) -> str:
        if not self.quantize:
            return ""
        return f" ({self.quantize} layer weights{' and LM head' if self.quantize_lm_head else ''})"

    def report(self) -> str:
        gb = lambda n: f"{'-':>9}" if n is None else f"{n / 1e9:9.2f} GB"  # noqa: E731
        cpu = self.compiled_on == "cpu"
        lines = [
            ("weights", self.weights),
            ("KV cache", self.kv_cache),
            ("compiled decode step: arguments", self.compiled_arguments),
            ("compiled decode step: outputs", self.compiled_outputs),
            ("  of which reuse the donated cache", self.compiled_aliased),
            (f"compiled decode step: temporaries ({self.compiled_on or 'not compiled'}){' *' if cpu else ''}",
             self.compiled_temp),
            ("GPU estimate: decode temporaries", self.gpu_temp_decode),
            (f"GPU estimate: prefill temporaries ({self.prefill_chunk} tokens)", self.gpu_temp_prefill),
            ("total: weights + KV cache + GPU temporaries", self.total),
        ]
        rows = [
            f"{self.model} on mesh {self.mesh}, {self.dtype}{self._quantized()}, "
            f"{self.cache_dtype} KV cache, batch {self.batch} x {self.max_seq_len} tokens, {self.attention} attention; "
            "bytes per device:"
        ] + [f"  {label:<50}{gb(value)}" for label, value in lines]
        if cpu:
            rows.append("  * the CPU compiler upcasts bf16 matmuls to float32: its temporaries overstate a GPU's")
        if self.device_memory is not None:
            usable = self.device_memory * self.usable_fraction
            verdict = "fits" if self.fits else "does NOT fit"
            rows.append(f"  {verdict} in {self.device_memory / 1e9:.1f} GB per device "
                        f"({self.usable_fraction:.0%} usable = {usable / 1e9:.1f} GB)")
        return "\n".join(rows)


def plan(
    config: LlamaConfig,
    mesh: str,
    *,
    dtype: str = "bfloat16",
    quantize: str | None = None,
    quantize_lm_head: bool = False,
    cache_dtype: str | None = None,
    max_seq_len: int | None = None,
    batch: int = 1,
    device_memory: int | str | None = None,
    usable_fraction: float = 0.95,
    attention: str = "xla",
    prefill_chunk: int = 1024,
    compile: bool = True,
    name: str = "model",
) -> MemoryPlan:
    """Plan `config` on `mesh` (a spec such as "tp=8") for `batch` slots of `max_seq_len` tokens.

    `dtype`: weights and activations; `quantize` ("int8" | "fp8"): layer weights stored 8-bit
    (llama_jax.quantization), with `quantize_lm_head` the untied LM head too; `cache_dtype`: the
    KV cache's (default `dtype`; "int8" adds scales).

    With `compile`, the decode step is compiled on the first dp*tp devices of this process
    (they must exist; on CPU, simulate them with XLA_FLAGS=--xla_force_host_platform_device_count=N
    before JAX starts, as scripts/plan.py does).
    """
    if attention not in ("xla", "pallas"):
        raise ValueError(f"attention must be 'xla' or 'pallas', got {attention!r}")
    max_seq_len = max_seq_len or config.max_seq_len
    n = devices_needed(mesh)
    if len(jax.devices()) < n:
        raise RuntimeError(
            f"mesh {mesh!r} needs {n} devices, this process has {len(jax.devices())}; run scripts/plan.py, "
            f"or set XLA_FLAGS=--xla_force_host_platform_device_count={n} JAX_PLATFORMS=cpu before JAX starts"
        )
    shardings = ModelShardings(config, make_mesh(mesh, jax.devices()[:n]))
    if batch % shardings.dp:
        raise ValueError(f"batch ({batch}) must be a multiple of dp ({shardings.dp})")
    wdtype = jnp.dtype(dtype)
    cdtype = jnp.dtype(cache_dtype or dtype)
    abstract = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, wdtype), param_shapes(config),
                            is_leaf=lambda x: isinstance(x, tuple))
    param_sh = shardings.params
    if quantize_lm_head and quantize is None:
        raise ValueError("quantize_lm_head needs quantize ('int8' or 'fp8')")
    if quantize is not None:
        quantize_all = functools.partial(quantize_params, mode=quantize, lm_head=quantize_lm_head)
        abstract = jax.eval_shape(quantize_all, abstract)
        param_sh = param_shardings(param_sh, abstract)
    params = _with_shardings(abstract, param_sh)
    cache = _with_shardings(jax.eval_shape(lambda: KVCache.zeros(config, batch, max_seq_len, cdtype)),
                            shardings.cache_for(cdtype))
    weights = sum(_shard_bytes(p) for p in jax.tree.leaves(params))
    kv = sum(_shard_bytes(c) for c in jax.tree.leaves(cache))

    stats = None
    if compile:
        stats = _compile_decode(config, shardings, params, cache, batch).memory_analysis()
    chunk = min(prefill_chunk, max_seq_len)
    temp = functools.partial(_gpu_temp, config, shardings, params, cache, wdtype, attention)
    return MemoryPlan(
        model=name, mesh=mesh, dtype=str(wdtype), quantize=quantize, quantize_lm_head=quantize_lm_head,
        cache_dtype=str(cdtype),
        max_seq_len=max_seq_len, batch=batch, attention=attention, prefill_chunk=chunk, weights=weights, kv_cache=kv,
        compiled_arguments=stats and stats.argument_size_in_bytes,
        compiled_outputs=stats and stats.output_size_in_bytes,
        compiled_aliased=stats and stats.alias_size_in_bytes,
        compiled_temp=stats and stats.temp_size_in_bytes,
        compiled_on=jax.devices()[0].platform if compile else None,
        gpu_temp_decode=temp(batch // shardings.dp, 1), gpu_temp_prefill=temp(1, chunk),
        device_memory=None if device_memory is None else parse_bytes(device_memory),
        usable_fraction=usable_fraction,
    )


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def _local_shape(x: Any) -> tuple[int, ...]:
    """Per-device shape of an abstract weight (of its value, for a quantized one)."""
    x = x.value if isinstance(x, QuantizedWeight) else x
    return x.sharding.shard_shape(x.shape)


def _compile_decode(config: LlamaConfig, shardings: ModelShardings, params: Any, cache: KVCache, batch: int) -> Any:
    """The engine's decode step (one token per slot, greedy) over the whole cache window."""

    def decode_step(params: Any, cache: KVCache, tokens: jax.Array, positions: jax.Array) -> tuple:
        logits, cache = forward(
            params, config, tokens[:, None], positions[:, None], cache, logits_at=jnp.zeros_like(tokens)
        )
        return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    rows = shardings.batch()
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    step = jax.jit(decode_step, out_shardings=(jax.tree.map(lambda c: c.sharding, cache), rows), donate_argnums=1)
    return step.lower(params, cache, tokens, tokens).compile()


def _gpu_temp(
    config: LlamaConfig, shardings: ModelShardings, params: Any, cache: KVCache, dtype: Any, attention: str,
    rows: int, tokens: int,
) -> int:
    """Largest buffers live at once in one layer of a step over `rows` x `tokens` new tokens
    attending over the whole cache, plus the logits and sampler: an upper bound that sums them
    although XLA reuses some."""
    a = jnp.dtype(dtype).itemsize
    f32 = 4
    layers = params["layers"]
    _, _, h, dh = _local_shape(layers["wq"])  # (L, D, H_local, Dh)
    kv_local = _local_shape(layers["wk"])[2]
    f_local = _local_shape(layers["w_gate"])[2]
    v_local = shardings.sharding(("embed", "vocab"), (config.dim, config.vocab_size)).shard_shape(
        (config.dim, config.vocab_size))[1]
    window = cache.k.shape[2]
    # Cache slots read per row and layer: stored values (and int8 scales) and their copy in `dtype`.
    read = kv_local * dh * (cache.k.dtype.itemsize + (a if cache.k.dtype != dtype else 0))
    read += kv_local * f32 if cache.k_scale is not None else 0
    n = rows * tokens
    parts = {
        # One layer's weights, in case the scan materialises the dynamic slice of the stacked array.
        "layer weights": sum(_shard_bytes(w) for w in jax.tree.leaves(layers)) // config.n_layers,
        "residual + norms (f32)": 3 * n * config.dim * f32,
        "q, k, v, attention out": n * (2 * h + 2 * kv_local) * dh * a,
        "k, v window": 2 * rows * window * read,  # k_all[layer, rows, :window]
        "scores + probabilities (f32)": 2 * n * h * window * f32 if attention == "xla" else 0,
        "MLP gate, up, product": 3 * n * f_local * a,
        # Logits of the last token per row, sharded; the sampler works on the gathered vocabulary.
        "logits + sampler": rows * (v_local + 4 * config.vocab_size) * f32,
    }
    return int(sum(parts.values()))
