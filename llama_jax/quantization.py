"""Quantized weights (int8 or float8_e4m3fn, one float32 scale per output channel) and the
int8 quantization of the KV cache (one scale per token and head).

Granularity. A layer weight puts its input (contraction) axes first: wq (D, H, Dh), wo (H, Dh, D),
w_down (F, D), ... (`INPUT_AXES` counts them). Its scale has the weight's rank, size 1 on the
input axes and the weight's size on the output axes: wq -> (1, H, Dh), wo -> (1, 1, D),
w_down -> (1, D); stacked layers add the leading layer axis to both. So a scale multiplies the
matmul's output, it slices under `lax.scan` with its weight, and it shards with the weight's own
logical axes (a size-1 axis is replicated). Quantization is symmetric absmax: w ~ value * scale.

Matmul. `QuantizedWeight.dense` (the `model.dense` hook) computes x . value in x's dtype with
float32 accumulation and multiplies the output by the scale: int8 and float8_e4m3fn values are
exact in bfloat16, so this equals the matmul with the dequantized weight. On Hopper GPUs a float8
weight instead meets float8 activations (one dynamic scale per token) in a float8 x float8
`dot_general` with float32 accumulation, as FBGEMM runs Meta's FP8 checkpoints.

Embeddings and norms are not quantized; an untied LM head (D, V) only on request
(`quantize_lm_head`, one scale per vocabulary entry): at Llama 3.1 8B it is 1 GB of 16 in bf16.

Why not qwix: its model-level API intercepts Flax modules and finds a weight among their params;
ours are plain arrays passed to a pure function and sliced by `lax.scan`, which it cannot see.
Its core (QArray, qwix.einsum) does run on them, but dequantizes the whole weight before the dot
when activations are floating point; here the scale goes on the output, so the dot's operand is a
bare conversion, and the same numpy/JAX function serves the converter (host numpy) and the loader.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .linear import weight_einsum

MODES = ("int8", "fp8")
_QDTYPE = {"int8": np.dtype(np.int8), "fp8": np.dtype(ml_dtypes.float8_e4m3fn)}
_QMAX = {"int8": 127.0, "fp8": float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)}  # 448 for e4m3fn

# Number of leading input (contraction) axes of each quantizable layer weight, after the layer axis.
INPUT_AXES: dict[str, int] = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
QUANTIZABLE = tuple(INPUT_AXES)
SCALE_SUFFIX = "_scale"  # on disk, the scale of "wq" is stored as "wq_scale"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def qdtype(mode: str) -> np.dtype:
    """Storage dtype of quantized values: int8 or float8_e4m3fn."""
    return _QDTYPE[check_mode(mode)]


@dataclasses.dataclass(frozen=True)
class WeightQuantization:
    """Which layer weights are quantized, and how. Stored as `quantization` in llama_jax.json."""

    mode: str
    weights: tuple[str, ...] = QUANTIZABLE

    def __post_init__(self) -> None:
        check_mode(self.mode)
        unknown = [w for w in self.weights if w not in INPUT_AXES]
        if unknown or not self.weights:
            raise ValueError(f"quantized weights must be a non-empty subset of {', '.join(QUANTIZABLE)}, "
                             f"got {list(self.weights)}")
        object.__setattr__(self, "weights", tuple(w for w in QUANTIZABLE if w in self.weights))

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "weights": list(self.weights)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "WeightQuantization":
        return cls(obj["mode"], tuple(obj["weights"]))

    def widen(self, mode: str) -> "WeightQuantization":
        """These weights plus every other quantizable weight, in `mode` (which must be theirs)."""
        if check_mode(mode) != self.mode:
            raise ValueError(f"the weights are already quantized as {self.mode}; they cannot be requantized as {mode}")
        return WeightQuantization(mode)


def scale_shape(name: str, shape: tuple[int, ...], stacked: bool = False) -> tuple[int, ...]:
    """The scale's shape for layer weight `name` of `shape` (with a leading layer axis if `stacked`)."""
    lead = int(stacked)
    n_in = INPUT_AXES[name]
    return tuple(1 if lead <= i < lead + n_in else s for i, s in enumerate(shape))


def input_axes(name: str, stacked: bool = False) -> tuple[int, ...]:
    lead = int(stacked)
    return tuple(range(lead, lead + INPUT_AXES[name]))


def quantize(w: Any, axes: tuple[int, ...], mode: str) -> tuple[Any, Any]:
    """Symmetric absmax quantization of a numpy or JAX array: (value, scale) with w ~ value * scale,
    one float32 scale per index of the axes not in `axes` (the scale keeps size 1 on `axes`)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    qmax = _QMAX[check_mode(mode)]
    w = w.astype(np.float32)
    amax = xp.max(xp.abs(w), axis=axes, keepdims=True)
    # Times the reciprocal, as XLA computes a division by a constant: numpy and JAX agree bit for bit.
    scale = xp.where(amax > 0, amax * np.float32(1 / qmax), np.float32(1)).astype(np.float32)  # zero rows: any scale
    x = xp.clip(w / scale, -qmax, qmax)
    if mode == "int8":
        x = xp.round(x)
    return x.astype(_QDTYPE[mode]), scale


@functools.cache
def fp8_matmul_supported() -> bool:
    """Whether the default device multiplies float8 matrices natively (NVIDIA Hopper or newer)."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    return device.platform == "gpu" and capability is not None and float(capability) >= 9.0


@functools.partial(jax.tree_util.register_dataclass, data_fields=["value", "scale"], meta_fields=["fp8_matmul"])
@dataclasses.dataclass
class QuantizedWeight:
    """A weight stored as `value` (int8 or float8_e4m3fn) times `scale` (float32; the value's rank,
    size 1 on the input axes). `fp8_matmul`: multiply a float8 value in float8 (activations
    quantized per token) rather than in the activations' dtype."""

    value: jax.Array
    scale: jax.Array
    fp8_matmul: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        return (self.value.astype(jnp.float32) * self.scale).astype(dtype)

    def dense(self, equation: str, x: jax.Array, out_dtype: Any = None) -> jax.Array:
        """x times the weight for an explicit two-operand einsum `equation` ("btd,dnh->btnh"), in
        `out_dtype` (default: x's dtype)."""
        inputs, out = equation.split("->")
        x_sub, w_sub = inputs.split(",")
        if self.fp8_matmul and self.value.dtype == _QDTYPE["fp8"]:
            xq, x_scale = quantize(x, tuple(i for i, c in enumerate(x_sub) if c not in out), "fp8")
            y = weight_einsum(equation, xq, self.value, preferred_element_type=jnp.float32)
            y = y * _on_output(x_scale, x_sub, out)
        else:
            y = weight_einsum(equation, x, self.value.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * _on_output(self.scale, w_sub, out)).astype(out_dtype or x.dtype)


def _on_output(a: jax.Array, sub: str, out: str) -> jax.Array:
    """A per-output-channel array `a` (subscripts `sub`, size 1 on the contracted ones) laid out to
    broadcast against the einsum output `out`."""
    kept = [c for c in sub if c in out]
    a = a.reshape([n for n, c in zip(a.shape, sub) if c in out])
    order = [c for c in out if c in kept]
    a = a.transpose([kept.index(c) for c in order])
    return a.reshape([a.shape[order.index(c)] if c in order else 1 for c in out])


def as_weight(value: jax.Array, scale: jax.Array) -> QuantizedWeight:
    """A QuantizedWeight that multiplies in float8 where this device can (a float8 value on Hopper)."""
    return QuantizedWeight(value, scale, fp8_matmul=value.dtype == _QDTYPE["fp8"] and fp8_matmul_supported())


def quantize_weight(w: jax.Array, name: str, mode: str, stacked: bool = True) -> QuantizedWeight:
    """Layer weight `name` (stacked over layers by default) quantized."""
    return as_weight(*quantize(w, input_axes(name, stacked), mode))


def quantize_lm_head(w: jax.Array, mode: str) -> QuantizedWeight:
    """The untied LM head (D, V) quantized on its devices, one scale per vocabulary entry, the
    scale sharded like the head's vocabulary axis."""
    check_mode(mode)
    out = (w.sharding, scale_sharding(w.sharding, (1, w.shape[1])))
    return as_weight(*jax.jit(functools.partial(quantize, axes=(0,), mode=mode), out_shardings=out)(w))


def quantize_params(
    params: Mapping[str, Any], mode: str, weights: tuple[str, ...] = QUANTIZABLE, lm_head: bool = False
) -> dict[str, Any]:
    """Parameters with the stacked layer weights `weights` (and with `lm_head`, the untied LM
    head) quantized; everything else unchanged. (Loading a checkpoint with `quantize=` does this
    one layer at a time instead.)"""
    layers = dict(params["layers"])
    for name in WeightQuantization(mode, weights).weights:
        layers[name] = quantize_weight(layers[name], name, mode)
    out = {**params, "layers": layers}
    if lm_head:
        if "lm_head" not in params:
            raise ValueError("the LM head is tied to the embeddings: there is no separate head to quantize")
        out["lm_head"] = as_weight(*quantize(params["lm_head"], (0,), mode))
    return out


def quantize_layer(tensors: Mapping[str, np.ndarray], spec: WeightQuantization) -> dict[str, np.ndarray]:
    """One layer's host tensors (internal layout, no layer axis) with the weights of `spec`
    quantized: "wq" becomes the quantized value and "wq_scale" its scale. Weights that arrive
    quantized (with a scale) are kept as they are."""
    out = dict(tensors)
    for name in spec.weights:
        if name + SCALE_SUFFIX not in tensors:
            out[name], out[name + SCALE_SUFFIX] = quantize(np.asarray(tensors[name]), input_axes(name), spec.mode)
    return out


def scale_sharding(sharding: Any, shape: tuple[int, ...]) -> Any:
    """The sharding of a scale of `shape` beside a weight sharded as `sharding`: the same, except
    that the scale's size-1 (input) axes are not split."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    spec = [None if n == 1 else axes for axes, n in zip(spec, shape)]
    while spec and spec[-1] is None:
        spec.pop()
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def param_shardings(shardings: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The sharding tree of `params` with quantized weights, given that of unquantized ones
    (`ModelShardings.params`): a QuantizedWeight's value keeps its weight's sharding, its scale
    too except along the size-1 input axes."""
    def pair(sharding: Any, w: QuantizedWeight) -> QuantizedWeight:
        return QuantizedWeight(sharding, scale_sharding(sharding, w.scale.shape), w.fp8_matmul)

    layers = {name: pair(shardings["layers"][name], w) if isinstance(w, QuantizedWeight) else shardings["layers"][name]
              for name, w in params["layers"].items()}
    out = {**shardings, "layers": layers}
    if isinstance(params.get("lm_head"), QuantizedWeight):
        out["lm_head"] = pair(shardings["lm_head"], params["lm_head"])
    return out


# ---------------------------------------------------------------- int8 KV cache


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys or values (..., K, Dh) -> int8 (..., K, Dh) and float32 scales (..., K)."""
    value, scale = quantize(x, (-1,), "int8")
    return value, scale[..., 0]


def dequantize_kv(value: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    return value.astype(dtype) * scale[..., None].astype(dtype)


def add_arguments(parser: Any) -> None:
    """The quantization flags of the scripts that load a model (generate.py, serve.py)."""
    g = parser.add_argument_group("quantization")
    g.add_argument("--quantize", choices=MODES, help="quantize the layer weights while loading (int8 or fp8)")
    g.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize an untied LM head (default: it stays in --dtype)")
    g.add_argument("--cache-dtype", choices=["int8", "bfloat16", "float32"],
                   help="KV cache dtype (default: --dtype; int8 keeps one scale per token and head)")


def load_arguments(args: Any) -> dict[str, Any]:
    """`llama_jax.load` keyword arguments from the flags of `add_arguments`."""
    return dict(quantize=args.quantize, quantize_lm_head=args.quantize_lm_head, cache_dtype=args.cache_dtype)
