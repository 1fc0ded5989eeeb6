"""LoRA adapters: low-rank updates W + (alpha / r) · A·B of the frozen projection weights.

The adapters of a model are a plain nested dict, trained and saved on their own:

    {"wq": {"a": (L, D, r), "b": (L, r, H, Dh)}, "wo": {"a": (L, H, Dh, r), "b": (L, r, D)}, ...}

`a` spans the weight's input axes, `b` its output axes, both with the leading layer axis so
`lax.scan` slices them with the layer's other weights. `b` starts at zero: a fresh adapter
leaves the model unchanged.

Three ways to run them:
- `apply` wraps each targeted weight in a `LoraWeight`, whose `dense` computes
  x·W + scale·(x·A)·B. W may be any weight `model.dense` accepts (an array, a quantized
  weight), so adapters compose with other weight kinds. Training uses this form.
- `merge` folds scale·A·B into array weights: inference then costs nothing extra.
- `attach_many` serves several adapters over one base at once: each targeted weight becomes a
  `MultiLoraWeight` holding all of them, and each batch row picks its own (or none) through
  the `rows` the engine sets for every call (`route`); vLLM's multi-LoRA serving.

On disk (`save` / `load`), an adapter directory holds:

    adapter_config.json   {"format": "llama-jax-lora", "version": 1, "rank", "alpha",
                           "targets": ["q", "v", ...], "model": {n_layers, dim, n_heads, ...}}
    weights/              Orbax checkpoint of the adapter dict (float32)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint
from .config import LlamaConfig
from .model import Params, dense, param_shapes

Adapters = dict[str, dict[str, jax.Array]]

FORMAT = "llama-jax-lora"
VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_DIR = "weights"

# Target name -> (layer weight, number of its input axes after the layer axis). The model's
# weights put their input axes first: wq (D, H, Dh), wo (H, Dh, D), w_down (F, D), ...
TARGETS: dict[str, tuple[str, int]] = {
    "q": ("wq", 1),
    "k": ("wk", 1),
    "v": ("wv", 1),
    "o": ("wo", 2),
    "gate": ("w_gate", 1),
    "up": ("w_up", 1),
    "down": ("w_down", 1),
}
# The model dimensions an adapter's shapes depend on; stored with it and checked on load.
_MODEL_FIELDS = ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")


class AdapterError(ValueError):
    """An adapter directory that cannot be read or does not fit the model; names the file."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"LoRA targets must be a non-empty subset of {', '.join(TARGETS)}, got {list(self.targets)}"
            )
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets repeat a name: {list(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def adapter_shapes(config: LlamaConfig, lora: LoraConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    shapes = param_shapes(config)["layers"]
    out = {}
    for t in lora.targets:
        name, n_in = TARGETS[t]
        layers, *dims = shapes[name]
        out[name] = {"a": (layers, *dims[:n_in], lora.rank), "b": (layers, lora.rank, *dims[n_in:])}
    return out


def init(config: LlamaConfig, lora: LoraConfig, key: jax.Array) -> Adapters:
    """Fresh float32 adapters: A ~ N(0, 1/fan_in), B = 0."""
    shapes = adapter_shapes(config, lora)
    return _draw(tuple((name, s["a"], s["b"]) for name, s in shapes.items()), key)


@functools.partial(jax.jit, static_argnums=0)  # one program, not one per random draw
def _draw(shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...], key: jax.Array) -> Adapters:
    keys = jax.random.split(key, len(shapes))
    return {
        name: {"a": jax.random.normal(k, a, jnp.float32) * math.prod(a[1:-1]) ** -0.5, "b": jnp.zeros(b, jnp.float32)}
        for k, (name, a, b) in zip(keys, shapes)
    }


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
    """A weight with a low-rank update: x·base + scale·(x·a)·b, without forming the sum.

    Leaves may carry a leading layer axis (scan slices it off before `dense` is called)."""

    base: Any
    a: jax.Array  # (*in_axes, r)
    b: jax.Array  # (r, *out_axes)
    scale: float = dataclasses.field(metadata=dict(static=True))

    def dense(self, equation: str, x: jax.Array, out_dtype: Any = None) -> jax.Array:
        y = dense(equation, x, self.base, out_dtype=out_dtype)
        inputs, out = equation.split("->")
        xs, ws = inputs.split(",")
        contracted = "".join(c for c in ws if c in xs)
        produced = "".join(c for c in ws if c not in xs)
        kept = "".join(c for c in xs if c not in ws)
        r = next(c for c in "rzyxwvuqponmlkjigfedcba" if c not in equation)
        xa = jnp.einsum(f"{xs},{contracted}{r}->{kept}{r}", x, self.a.astype(x.dtype))
        update = jnp.einsum(f"{kept}{r},{r}{produced}->{out}", xa, self.b.astype(x.dtype))
        return y + (self.scale * update).astype(y.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MultiLoraWeight:
    """A weight with N low-rank updates, one picked per batch row: row i computes
    x·base + scale[k]·(x·a[k])·b[k] with k = rows[i]. Entry 0 is no adapter (zeros), so a row
    with k = 0 gets the base weight's product alone. Ranks below the largest are zero-padded."""

    base: Any
    a: jax.Array  # (N + 1, *in_axes, r)
    b: jax.Array  # (N + 1, r, *out_axes)
    scale: jax.Array  # (N + 1,)
    rows: jax.Array  # (at least the batch,) int32: each row's adapter (`route` sets it per call)

    def dense(self, equation: str, x: jax.Array, out_dtype: Any = None) -> jax.Array:
        """With one token per row (decode) and at least as many rows as adapters (the base's
        zeros included), every adapter's A and B are read once and each row keeps its own through
        a one-hot weighting: per-row copies of A and B would move more bytes. Otherwise (prefill,
        or few rows) each row's A and B are gathered, so the extra products stay one adapter's."""
        y = dense(equation, x, self.base, out_dtype=out_dtype)
        inputs, out = equation.split("->")
        xs, ws = inputs.split(",")
        batch = xs[0]  # the model's products all take x as (batch, tokens, ...)
        contracted = "".join(c for c in ws if c in xs)
        produced = "".join(c for c in ws if c not in xs)
        kept = "".join(c for c in xs if c not in ws)
        r, n = [c for c in "rnzyxwvuqpomlkjigfedca" if c not in equation][:2]
        ids = self.rows[: x.shape[0]]
        if x.shape[1] == 1 and self.scale.shape[0] <= x.shape[0]:
            pick = (ids[:, None] == jnp.arange(self.scale.shape[0])) * self.scale  # (batch, N + 1)
            xa = jnp.einsum(f"{xs},{n}{contracted}{r}->{kept}{n}{r}", x, self.a.astype(x.dtype))
            update = jnp.einsum(f"{kept}{n}{r},{batch}{n},{n}{r}{produced}->{out}", xa, pick.astype(x.dtype),
                                self.b.astype(x.dtype))
        else:
            a = self.a[ids].astype(x.dtype)
            b = (self.b[ids] * self.scale[ids].reshape(-1, *[1] * (self.b.ndim - 1))).astype(x.dtype)
            xa = jnp.einsum(f"{xs},{batch}{contracted}{r}->{kept}{r}", x, a)
            update = jnp.einsum(f"{kept}{r},{batch}{r}{produced}->{out}", xa, b)
        return y + update.astype(y.dtype)


def _adapt(params: Params, adapters: Adapters, fn: Callable[[Any, jax.Array, jax.Array], Any]) -> Params:
    """Params with each adapted weight w replaced by fn(w, a, b), in either layer layout: stacked
    (w, a, b with their layer axis) or one tree per layer (each layer's slice of a and b)."""
    layers = params["layers"]
    if isinstance(layers, dict):
        return {**params, "layers": {**layers, **{n: fn(layers[n], ab["a"], ab["b"]) for n, ab in adapters.items()}}}
    return {**params, "layers": tuple(
        {**layer, **{n: fn(layer[n], ab["a"][i], ab["b"][i]) for n, ab in adapters.items()}}
        for i, layer in enumerate(layers)
    )}


def apply(params: Params, adapters: Adapters, lora: LoraConfig) -> Params:
    """Params whose adapted weights are `LoraWeight`s: the update is computed on the fly."""
    return _adapt(params, adapters, lambda w, a, b: LoraWeight(w, a, b, lora.scale))


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale·A·B as a dense (L, *in_axes, *out_axes) float32 array."""
    layers, rank = a.shape[0], a.shape[-1]
    in_shape, out_shape = a.shape[1:-1], b.shape[2:]
    a2 = a.reshape(layers, -1, rank).astype(jnp.float32)
    b2 = b.reshape(layers, rank, -1).astype(jnp.float32)
    return (scale * (a2 @ b2)).reshape(layers, *in_shape, *out_shape)


def merge(params: Params, adapters: Adapters, lora: LoraConfig, *, donate: bool = False) -> Params:
    """Params with the adapters folded into the weights (same dtypes and shardings). `donate`
    lets each new weight reuse the old one's memory (the old arrays become unusable).

    A weight that is not an array (e.g. a quantized one) cannot take the sum without being
    requantized; it keeps its adapter as a `LoraWeight`, applied on the fly."""
    stacked = isinstance(params["layers"], dict)

    def fold(w: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        d = delta(a, b, lora.scale) if stacked else delta(a[None], b[None], lora.scale)[0]
        return (w.astype(jnp.float32) + d).astype(w.dtype)

    def merged(w: Any, a: jax.Array, b: jax.Array) -> Any:
        if not isinstance(w, jax.Array):
            return LoraWeight(w, a, b, lora.scale)
        # One weight per program: the float32 update of one weight is the only temporary.
        return jax.jit(fold, out_shardings=w.sharding, donate_argnums=(0,) if donate else ())(w, a, b)

    return _adapt(params, adapters, merged)


# ---------------------------------------------------------------- saving and loading


def save(directory: str | os.PathLike, adapters: Adapters, lora: LoraConfig, config: LlamaConfig,
         overwrite: bool = True) -> Path:
    """Write adapter_config.json and weights/ into `directory` (created if needed; other files
    there are left alone). The config is removed first and written last, so a directory with
    one always has complete weights."""
    import orbax.checkpoint as ocp

    dst = Path(directory).absolute()
    if (dst / CONFIG_FILE).exists() and not overwrite:
        raise AdapterError(f"{dst}: already holds an adapter")
    expected = adapter_shapes(config, lora)
    got = {n: {k: tuple(v.shape) for k, v in ab.items()} for n, ab in adapters.items()}
    if got != expected:
        raise AdapterError(f"adapter shapes {got} do not match the LoRA config {lora} of this model ({expected})")
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / f".{WEIGHTS_DIR}.tmp-{secrets.token_hex(4)}"
    try:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp, jax.tree.map(lambda x: np.asarray(x, np.float32), adapters))
            ckpt.wait_until_finished()
        (dst / CONFIG_FILE).unlink(missing_ok=True)
        shutil.rmtree(dst / WEIGHTS_DIR, ignore_errors=True)
        tmp.rename(dst / WEIGHTS_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {"format": FORMAT, "version": VERSION, "rank": lora.rank, "alpha": lora.alpha,
            "targets": list(lora.targets), "model": {f: getattr(config, f) for f in _MODEL_FIELDS}}
    (dst / f".{CONFIG_FILE}.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    (dst / f".{CONFIG_FILE}.tmp").replace(dst / CONFIG_FILE)
    return dst


def read_config(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, int]]:
    """The LoRA config of an adapter directory and the model dimensions it was trained for."""
    file = Path(directory) / CONFIG_FILE
    meta = checkpoint.read_descriptor(file, FORMAT, VERSION, AdapterError, "a llama-jax LoRA adapter directory")
    try:
        lora = LoraConfig(rank=meta["rank"], alpha=meta["alpha"], targets=tuple(meta["targets"]))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{file}: {type(e).__name__}: {e}") from None
    model = meta.get("model")
    if not isinstance(model, dict):
        raise AdapterError(f"{file}: missing the model dimensions")
    return lora, model


def load(directory: str | os.PathLike, config: LlamaConfig, sharding: Any = None) -> tuple[Adapters, LoraConfig]:
    """Read an adapter directory for a model of `config`; arrays go to `sharding` (default:
    the first device). Raises AdapterError when it was trained for another model shape."""
    import orbax.checkpoint as ocp

    directory = Path(directory)
    lora, model = read_config(directory)
    mismatch = [f"{f}={model.get(f)!r} (model: {getattr(config, f)})" for f in _MODEL_FIELDS
                if model.get(f) != getattr(config, f)]
    if mismatch:
        raise AdapterError(f"{directory / CONFIG_FILE}: trained for another model: {', '.join(mismatch)}")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = adapter_shapes(config, lora)
    abstract = {n: {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding) for k, s in ab.items()}
                for n, ab in shapes.items()}
    weights = directory / WEIGHTS_DIR
    if not weights.is_dir():
        raise AdapterError(f"{weights}: missing")
    with ocp.StandardCheckpointer() as ckpt:
        try:
            stored = ckpt.metadata(weights).item_metadata.tree
            got = {n: {k: tuple(m.shape) for k, m in ab.items()} for n, ab in stored.items()}
        except Exception as e:  # Orbax raises assorted types for damaged metadata
            raise AdapterError(f"{weights}: unreadable Orbax checkpoint ({type(e).__name__}: {e})") from None
        if got != shapes:
            raise AdapterError(f"{weights}: tensors {got} do not match {directory / CONFIG_FILE} ({shapes})")
        try:
            adapters = ckpt.restore(weights, abstract)
        except Exception as e:  # truncated or corrupted data files
            raise AdapterError(f"{weights}: cannot read tensor data ({type(e).__name__}: {e})") from None
    return adapters, lora


def attach(params: Params, directory: str | os.PathLike, config: LlamaConfig, *, merge_adapters: bool = True,
           sharding: Any = None) -> Params:
    """`params` (either layer layout) with the adapters of `directory` merged in (default) or
    applied on the fly as `LoraWeight`s; the adapters go to `sharding` (default: the first device)."""
    adapters, lora = load(directory, config, sharding=sharding)
    if merge_adapters:
        return merge(params, adapters, lora, donate=True)
    return apply(params, adapters, lora)


def attach_many(params: Params, directories: Sequence[str | os.PathLike], config: LlamaConfig, *,
                sharding: Any = None, slots: int | None = None, max_rank: int | None = None) -> Params:
    """`params` (one tree per layer) with the adapters of `directories` all held at once, as
    `MultiLoraWeight`s: adapter k (1-based, in the given order) runs on the batch rows whose
    `route` id is k, and id 0 is the base model; every call must be routed. The targets and
    ranks may differ between adapters (a missing target is zeros); the adapters go to `sharding`.

    `slots` (default: one per directory) beyond the directories are left empty for adapters
    written later with `put`: then every target is held, at rank `max_rank` (default: the
    largest given), so that any adapter up to that rank fits."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        raise AdapterError("serving several adapters needs one weight tree per layer (load(scan_layers=False))")
    if slots is None:
        if not directories:
            raise AdapterError("no adapter directories given")
        slots = len(directories)
    elif slots < 1:
        raise AdapterError(f"slots must be >= 1, got {slots}")
    if len(directories) > slots:
        raise AdapterError(f"{len(directories)} adapters for {slots} slots")
    loaded = [load(d, config, sharding=sharding) for d in directories]
    if max_rank is None:
        if not loaded:
            raise AdapterError("empty adapter slots need max_rank")
        max_rank = max(lora.rank for _, lora in loaded)
    if slots > len(loaded):
        names = [name for name, _ in TARGETS.values()]
    else:
        names = sorted({name for adapters, _ in loaded for name in adapters}, key=list(layers[0]).index)
    shapes = param_shapes(config)["layers"]
    # A and B in the activations' dtype (the embedding's), which `dense` computes in anyway: half
    # the bytes read per decode step in bfloat16 (vLLM keeps LoRA weights in the model's dtype too).
    dtype = getattr(params["embed"], "dtype", jnp.float32)
    scale = jnp.zeros((slots + 1,), jnp.float32)
    rows = jnp.zeros((1,), jnp.int32)

    def zeros(name: str, key: str) -> jax.Array:
        n_in = next(n for w, n in TARGETS.values() if w == name)
        dims = shapes[name][1:]
        shape = (*dims[:n_in], max_rank) if key == "a" else (max_rank, *dims[n_in:])
        return jnp.zeros((slots + 1, *shape), dtype)

    # Committed, as `put` leaves them: committed and uncommitted arguments compile different programs.
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    scale, rows = jax.device_put((scale, rows), sharding)
    out = {**params, "layers": tuple(
        {**layer, **{n: MultiLoraWeight(layer[n], *jax.device_put((zeros(n, "a"), zeros(n, "b")), sharding),
                                        scale, rows) for n in names}}
        for layer in layers
    )}
    for k, (adapters, lora) in enumerate(loaded, 1):
        out = put(out, k, adapters, lora)
    return out


def slot_layout(params: Params) -> tuple[int, int, tuple[str, ...]]:
    """(slots, rank, target names) of the `MultiLoraWeight`s of `attach_many`; (0, 0, ()) if none."""
    held = {n: w for n, w in params["layers"][0].items() if isinstance(w, MultiLoraWeight)} \
        if isinstance(params["layers"], (list, tuple)) else {}
    if not held:
        return 0, 0, ()
    w = next(iter(held.values()))
    return w.scale.shape[0] - 1, w.a.shape[-1], tuple(held)


def check_fits(params: Params, adapters: Adapters, lora: LoraConfig) -> None:
    """Raise AdapterError unless the slots of `attach_many` can hold `adapters` (rank, targets)."""
    _, rank, held = slot_layout(params)
    if lora.rank > rank:
        raise AdapterError(f"the adapter's rank {lora.rank} is above the {rank} its slot holds (the max LoRA rank)")
    missing = sorted(set(adapters) - set(held))
    if missing:
        raise AdapterError(f"the adapter targets {missing}, which the adapter slots do not hold "
                           "(spare slots hold every target)")


def put(params: Params, slot: int, adapters: Adapters, lora: LoraConfig) -> Params:
    """`params` of `attach_many` with adapter slot `slot` (1-based) now holding `adapters`
    (zero-padded to the slots' rank; the targets it lacks zeros). The arrays keep their shapes
    and placement, so compiled programs run the result as they ran `params`."""
    slots, rank, held = slot_layout(params)
    if not 1 <= slot <= slots:
        raise AdapterError(f"adapter slot {slot} is outside [1, {slots}]")
    check_fits(params, adapters, lora)
    first = params["layers"][0][held[0]]
    scale = jax.device_put(first.scale.at[slot].set(lora.scale), first.scale.sharding)

    def part(w: MultiLoraWeight, name: str, key: str, i: int) -> jax.Array:
        full = w.a if key == "a" else w.b
        if name in adapters:
            t = adapters[name][key][i]
            pad = [(0, 0)] * t.ndim
            pad[-1 if key == "a" else 0] = (0, rank - lora.rank)
            value = jnp.pad(t.astype(full.dtype), pad)
        else:
            value = jnp.zeros(full.shape[1:], full.dtype)
        return jax.device_put(full.at[slot].set(value), full.sharding)

    return {**params, "layers": tuple(
        {**layer, **{n: dataclasses.replace(layer[n], a=part(layer[n], n, "a", i), b=part(layer[n], n, "b", i),
                                            scale=scale) for n in held}}
        for i, layer in enumerate(params["layers"])
    )}


def take(params: Params, slot: int) -> tuple[Adapters, LoraConfig]:
    """The adapter slot `slot` of `attach_many` holds, on the host, at the slots' rank (`put`
    writes it back unchanged)."""
    slots, rank, held = slot_layout(params)
    if not 1 <= slot <= slots:
        raise AdapterError(f"adapter slot {slot} is outside [1, {slots}]")
    layers = params["layers"]
    adapters = {n: {k: np.stack([np.asarray(getattr(layer[n], k)[slot]) for layer in layers]) for k in "ab"}
                for n in held}
    scale = float(layers[0][held[0]].scale[slot])
    targets = tuple(t for t, (w, _) in TARGETS.items() if w in held)
    return adapters, LoraConfig(rank=rank, alpha=scale * rank, targets=targets)


def adapter_count(params: Params) -> int:
    """How many adapters `attach_many` gave `params` (0: none)."""
    layers = params["layers"]
    for layer in layers if isinstance(layers, (list, tuple)) else [layers]:
        for w in layer.values():
            if isinstance(w, MultiLoraWeight):
                return w.scale.shape[0] - 1
    return 0


def route(params: Params, ids: np.ndarray) -> Params:
    """`params` of `attach_many` whose batch row i runs adapter ids[i] (0: none); `ids` at least
    as long as the batch."""
    ids = np.asarray(ids, np.int32)
    return {**params, "layers": tuple(
        {n: dataclasses.replace(w, rows=ids) if isinstance(w, MultiLoraWeight) else w for n, w in layer.items()}
        for layer in params["layers"]
    )}
