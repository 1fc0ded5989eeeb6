"""The on-disk checkpoint format: one Orbax checkpoint per layer, so that writing and
restoring stream one layer at a time (host peak near one layer, not the model).

Layout of a checkpoint directory:

    llama_jax.json        {"format": "llama-jax", "version": 2, "dtype": "bfloat16",
                           "n_layers": L, "source": "hf" | "meta" | "gguf",
                           ["quantization": {"mode": "int8" | "fp8", "weights": ["wq", ...]}]}
                          written last: a directory without it is not a checkpoint
    model_config.json     LlamaConfig.save (named so it never clashes with a copied HF config.json)
    params/globals/embed/ Orbax checkpoint of {"embed": array}; likewise norm/ and (untied) lm_head/:
                          the two largest tensors are written and restored one at a time
    params/layer_00000/   Orbax checkpoint of one layer's dict (LAYER_KEYS)
    ...
    <tokenizer files>     copied from the source: tokenizer.model, tokenizer.json,
                          tokenizer_config.json, ... and, for GGUF sources, gguf_tokenizer.json
Arrays are stored in chunks of at most CHUNK_BYTES (parallel compression, partial reads).

Tensor names and shapes (D dim, H n_heads, K n_kv_heads, Dh head_dim, F ffn_dim, V vocab):
    embed (V, D)  norm (D,)  lm_head (D, V), absent when config.tie_embeddings
    attn_norm (D,)  wq (D, H, Dh)  wk (D, K, Dh)  wv (D, K, Dh)  wo (H, Dh, D)
    mlp_norm (D,)  w_gate (D, F)  w_up (D, F)  w_down (F, D)
Rotary layout: half-split ("rotate_half"): within a head, dim j pairs with j + Dh/2.
Quantized checkpoints store each weight listed under "quantization" as int8 or float8_e4m3fn,
with a float32 scale beside it (wq_scale (1, H, Dh), wo_scale (1, 1, D), w_down_scale (1, D),
...; see llama_jax/quantization.py); "dtype" is then the dtype of the other tensors.

gguf_tokenizer.json (the tokenizer of a GGUF source; the .gguf itself is not copied):
    {"format": "gguf-tokenizer", "version": 1, "source": "<name of the .gguf file>",
     "metadata": {<every GGUF key starting with "tokenizer.", verbatim, as plain JSON values>}}
    e.g. "tokenizer.ggml.model": "gpt2" (byte-level BPE) | "llama" (SentencePiece),
    "tokenizer.ggml.pre": "smollm" | "llama-bpe" | ..., "tokenizer.ggml.tokens": [str, ...],
    "tokenizer.ggml.token_type": [int, ...] (1 normal, 2 unknown, 3 control, 4 user-defined,
    5 unused, 6 byte), "tokenizer.ggml.merges": ["a b", ...], "tokenizer.ggml.scores": [float, ...],
    "tokenizer.ggml.bos_token_id" / eos_ / eot_ / eom_ / unknown_ / padding_token_id: int,
    "tokenizer.ggml.add_bos_token": bool, "tokenizer.chat_template": str,
    "tokenizer.chat_template.<name>": str. Keys absent from the GGUF file are absent here too.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

import numpy as np

from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.model import LAYER_PARAMS, layer_sharding, param_shapes
from llama_jax.quantization import (
    SCALE_SUFFIX, WeightQuantization, as_weight, input_axes, qdtype, scale_shape, scale_sharding,
)
from llama_jax.quantization import quantize as quantize_array

FORMAT = "llama-jax"
VERSION = 2  # 2: one Orbax checkpoint per global tensor; gguf_tokenizer.json holds GGUF metadata
META_FILE = "llama_jax.json"
CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
DTYPES = ("bfloat16", "float32")
SOURCES = ("hf", "meta", "gguf")
LAYER_KEYS = LAYER_PARAMS
_RESERVED = {META_FILE, CONFIG_FILE, PARAMS_DIR}
CHUNK_BYTES = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the file and tensor."""


def global_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors outside the layers (the model's layout, model.param_shapes)."""
    return {k: v for k, v in param_shapes(config).items() if k != "layers"}


def layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's tensors: the stacked shapes without the leading layer axis."""
    return {k: v[1:] for k, v in param_shapes(config)["layers"].items()}


TensorSpecs = Mapping[str, tuple[tuple[int, ...], np.dtype]]  # name -> (shape, dtype)


def layer_specs(config: LlamaConfig, dtype: np.dtype, quantization: WeightQuantization | None) -> TensorSpecs:
    """Shape and dtype of each tensor of a stored layer: the quantized weights in their quantized
    dtype, each with a float32 scale beside it ("wq_scale"), the rest in `dtype`."""
    specs = {k: (s, np.dtype(dtype)) for k, s in layer_shapes(config).items()}
    for name in quantization.weights if quantization else ():
        shape = specs[name][0]
        specs[name] = (shape, qdtype(quantization.mode))
        specs[name + SCALE_SUFFIX] = (scale_shape(name, shape), np.dtype(np.float32))
    return specs


def _shapes(specs: TensorSpecs) -> dict[str, tuple[int, ...]]:
    return {k: shape for k, (shape, _) in specs.items()}


def _np_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _layer_dir(root: Path, i: int) -> Path:
    return root / PARAMS_DIR / f"layer_{i:05d}"


def _global_dir(root: Path, name: str) -> Path:
    return root / PARAMS_DIR / "globals" / name


def _check_tensors(
    where: str, tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]
) -> None:
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing)}")
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor(s) {', '.join(extra)}")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {got}, the config says {shape}")


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


class CheckpointWriter:
    """Writes a checkpoint into `DST.tmp-<random>` and renames it to DST only when complete.

    Use as a context manager; on any error the temporary directory is removed, so a
    half-written DST never exists.
    """

    def __init__(
        self, dst: str | os.PathLike, config: LlamaConfig, dtype: str, source: str, overwrite: bool = False,
        quantization: WeightQuantization | None = None,
    ) -> None:
        if source not in SOURCES:
            raise CheckpointError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        self.dst = Path(dst).absolute()
        self.config = config
        self.dtype = dtype
        self.source = source
        self.overwrite = overwrite
        self._np_dtype = _np_dtype(dtype)
        self._global_shapes = global_shapes(config)
        self.quantization = quantization
        self._layer_specs = layer_specs(config, self._np_dtype, quantization)
        self._globals_written: set[str] = set()
        self._layers_written: set[int] = set()
        self._tmp: Path | None = None
        self._ckpt: Any = None
        self._check_destination()

    def _check_destination(self) -> None:
        if not self.dst.exists():
            return
        if not self.overwrite:
            raise CheckpointError(f"{self.dst}: already exists (pass overwrite=True / --overwrite to replace it)")
        # Only ever replace something we wrote ourselves (or an empty directory), never an arbitrary folder.
        if not (is_checkpoint(self.dst) or (self.dst.is_dir() and not any(self.dst.iterdir()))):
            raise CheckpointError(f"{self.dst}: exists and is not a llama-jax checkpoint; refusing to overwrite it")

    def __enter__(self) -> "CheckpointWriter":
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.dst.with_name(f"{self.dst.name}.tmp-{secrets.token_hex(4)}")
        (self._tmp / PARAMS_DIR).mkdir(parents=True)
        self._ckpt = _checkpointer()
        self.config.save(self._tmp / CONFIG_FILE)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self._finish()
        except BaseException:
            self._abort()
            raise
        else:
            if exc_type is not None:
                self._abort()
        finally:
            self._ckpt.close()

    def _abort(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _finish(self) -> None:
        tmp = self._require_open()
        missing = sorted(set(range(self.config.n_layers)) - self._layers_written)
        unwritten = [k for k in self._global_shapes if k not in self._globals_written]
        if unwritten:
            raise CheckpointError(f"{self.dst}: incomplete checkpoint, tensor(s) {', '.join(unwritten)} "
                                  "were never written")
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise CheckpointError(f"{self.dst}: incomplete checkpoint, layer(s) {shown} were never written")
        meta = {"format": FORMAT, "version": VERSION, "dtype": self.dtype, "n_layers": self.config.n_layers,
                "source": self.source}
        if self.quantization is not None:
            meta["quantization"] = self.quantization.to_json()
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        self._check_destination()  # something may have appeared there meanwhile
        old = None
        if self.dst.exists():
            old = self.dst.with_name(f"{self.dst.name}.old-{secrets.token_hex(4)}")
            self.dst.rename(old)
        tmp.rename(self.dst)
        self._tmp = None
        if old is not None:
            shutil.rmtree(old)

    def _require_open(self) -> Path:
        if self._tmp is None:
            raise CheckpointError("CheckpointWriter must be used as a context manager (with CheckpointWriter(...) as w)")
        return self._tmp

    def _save(self, directory: Path, where: str, tensors: Mapping[str, Any], specs: TensorSpecs) -> None:
        import orbax.checkpoint as ocp

        _check_tensors(where, tensors, _shapes(specs))
        quantized = self.quantization.weights if self.quantization else ()
        for k in quantized:  # quantized values arrive quantized: a cast would be meaningless
            if k in tensors and np.dtype(tensors[k].dtype) != specs[k][1]:
                raise CheckpointError(f"{where}: tensor {k} is {tensors[k].dtype}; this checkpoint stores it "
                                      f"quantized as {specs[k][1]}")
        # One C-ordered copy in the target dtype (float32 -> bfloat16 rounds to nearest even).
        tree = {k: np.array(tensors[k], dtype=dtype, order="C") for k, (_, dtype) in specs.items()}
        save_args = {k: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) for k in tree}
        self._ckpt.save(directory, tree, save_args=save_args)
        self._ckpt.wait_until_finished()

    def write_global(self, name: str, tensor: np.ndarray) -> None:
        """One of embed, norm, lm_head (absent when tied); converters stream them one by one."""
        tmp = self._require_open()
        if name not in self._global_shapes:
            raise CheckpointError(f"unexpected global tensor {name!r}; expected {', '.join(self._global_shapes)}")
        if name in self._globals_written:
            raise CheckpointError(f"{self.dst}: tensor {name} was already written")
        spec = {name: (self._global_shapes[name], self._np_dtype)}
        self._save(_global_dir(tmp, name), name, {name: tensor}, spec)
        self._globals_written.add(name)

    def write_globals(self, tensors: Mapping[str, np.ndarray]) -> None:
        """All global tensors at once (embed, norm and, untied, lm_head)."""
        self._require_open()
        _check_tensors("global tensors", tensors, self._global_shapes)
        for name in self._global_shapes:
            self.write_global(name, tensors[name])

    def write_layer(self, i: int, tensors: Mapping[str, np.ndarray]) -> None:
        tmp = self._require_open()
        if not 0 <= i < self.config.n_layers:
            raise CheckpointError(f"layer index {i} is out of range for a {self.config.n_layers}-layer config")
        if i in self._layers_written:
            raise CheckpointError(f"{self.dst}: layer {i} was already written")
        self._save(_layer_dir(tmp, i), f"layer {i}", tensors, self._layer_specs)
        self._layers_written.add(i)

    def _target(self, name: str) -> Path:
        if Path(name).name != name or name in _RESERVED or name.startswith("."):
            raise CheckpointError(f"{name!r} is not an allowed file name inside a checkpoint")
        return self._require_open() / name

    def copy_file(self, src: str | os.PathLike, name: str | None = None) -> None:
        """Copies a file (tokenizer, generation config, ...) into the checkpoint directory."""
        src = Path(src)
        shutil.copyfile(src, self._target(name or src.name))

    def write_json(self, name: str, obj: Any) -> None:
        self._target(name).write_text(json.dumps(obj, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- reading


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` holds a finished llama-jax checkpoint (cheap: reads only llama_jax.json)."""
    try:
        meta = json.loads((Path(path) / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def read_descriptor(file: Path, fmt: str, version: int, error: type[Exception], what: str) -> dict[str, Any]:
    """A JSON file that says which format (`fmt`, `version`) its directory holds; `error` names the file."""
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise error(f"{file}: missing; {file.parent} is not {what}") from None
    except (OSError, ValueError) as e:
        raise error(f"{file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f"{file}: not a description of {what}")
    if meta.get("version") != version:
        raise error(f"{file}: format version {meta.get('version')!r} is not supported (expected {version})")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """llama_jax.json, validated."""
    file = Path(path) / META_FILE
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: not a directory")
    meta = read_descriptor(file, FORMAT, VERSION, CheckpointError, "a (finished) llama-jax checkpoint")
    if meta.get("dtype") not in DTYPES:
        raise CheckpointError(f"{file}: unknown dtype {meta.get('dtype')!r}")
    if "quantization" in meta:
        try:
            WeightQuantization.from_json(meta["quantization"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{file}: bad quantization entry {meta['quantization']!r} ({e})") from None
    return meta


def read_quantization(path: str | os.PathLike) -> WeightQuantization | None:
    """Which layer weights the checkpoint stores quantized, and how; None when none are."""
    meta = read_metadata(path)
    return WeightQuantization.from_json(meta["quantization"]) if "quantization" in meta else None


def read_config(path: str | os.PathLike) -> LlamaConfig:
    meta = read_metadata(path)
    file = Path(path) / CONFIG_FILE
    try:
        config = LlamaConfig.load(file)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    if meta.get("n_layers") != config.n_layers:
        raise CheckpointError(
            f"{Path(path) / META_FILE}: n_layers={meta.get('n_layers')!r} disagrees with {file} ({config.n_layers})"
        )
    return config


def _stored_tree(directory: Path, ckpt: Any) -> dict[str, Any]:
    """The names, shapes and dtypes stored in one Orbax checkpoint, without reading data."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: missing")
    try:
        tree = ckpt.metadata(directory).item_metadata.tree
    except Exception as e:  # Orbax raises assorted types for damaged metadata
        raise CheckpointError(f"{directory}: unreadable Orbax checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{directory}: unexpected checkpoint structure")
    return dict(tree)


def _restore(directory: Path, ckpt: Any, specs: TensorSpecs, shardings: Mapping[str, Any] | None) -> dict[str, Any]:
    import jax

    stored = _stored_tree(directory, ckpt)
    _check_tensors(str(directory), stored, _shapes(specs))
    for name, m in stored.items():
        if np.dtype(m.dtype) != specs[name][1]:
            raise CheckpointError(
                f"{directory}: tensor {name} is stored as {m.dtype}, llama_jax.json says {specs[name][1]}")
    abstract = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=None if shardings is None else shardings[k])
        for k, (shape, dtype) in specs.items()
    }
    try:
        return ckpt.restore(directory, abstract)
    except Exception as e:  # truncated or corrupted data files
        raise CheckpointError(f"{directory}: cannot read tensor data ({type(e).__name__}: {e})") from None


def _read_host(path: str | os.PathLike, i: int | None) -> dict[str, np.ndarray]:
    root = Path(path)
    config = read_config(root)
    dtype = _np_dtype(read_metadata(root)["dtype"])
    if i is None:
        parts = [(_global_dir(root, k), {k: (shape, dtype)}) for k, shape in global_shapes(config).items()]
    else:
        if not 0 <= i < config.n_layers:
            raise CheckpointError(f"{root}: layer index {i} is out of range (n_layers={config.n_layers})")
        parts = [(_layer_dir(root, i), layer_specs(config, dtype, read_quantization(root)))]
    ckpt = _checkpointer()
    try:
        return {k: np.asarray(v) for d, specs in parts for k, v in _restore(d, ckpt, specs, None).items()}
    finally:
        ckpt.close()


def read_globals(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """embed, norm and (untied) lm_head as host numpy arrays in the stored dtype."""
    return _read_host(path, None)


def read_layer(path: str | os.PathLike, i: int) -> dict[str, np.ndarray]:
    """One layer's tensors as host numpy arrays in the stored dtypes (with "wq_scale", ... when quantized)."""
    return _read_host(path, i)


def restore_params(
    path: str | os.PathLike,
    dtype: str | None = None,
    shardings: Mapping[str, Any] | None = None,
    progress: bool = True,
    quantize: str | None = None,
    stacked: bool = True,
) -> dict[str, Any]:
    """Restores a checkpoint onto device(s), layer by layer.

    Returns {"embed", "norm", ["lm_head"], "layers": {name: (L, ...) array}}, or with
    `stacked=False` "layers" as a tuple of per-layer {name: array} (the layout `forward` runs
    unrolled, model.unstack_layers); the same shardings apply. `dtype` defaults to
    the stored dtype. `shardings`, if given, has the same structure and holds a
    jax.sharding.Sharding per array (for "layers", the sharding of the stacked array); by default
    everything goes to the first device. The stacked arrays are preallocated and each layer is
    written into them with a donated update, so device memory peaks at the model plus one layer.

    Weights stored quantized come back as `quantization.QuantizedWeight`s (value and scale, each
    stacked; the scale sharded like its weight except along its size-1 input axes). `quantize`
    ("int8" | "fp8") quantizes all layer weights, each layer on device as it arrives.
    """
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    root = Path(path)
    config = read_config(root)
    stored = _np_dtype(read_metadata(root)["dtype"])
    target = jnp.dtype(dtype) if dtype is not None else stored
    stored_q = target_q = read_quantization(root)
    if quantize is not None:
        try:
            target_q = stored_q.widen(quantize) if stored_q else WeightQuantization(quantize)
        except ValueError as e:
            raise CheckpointError(f"{root}: {e}") from None
    to_quantize = [w for w in target_q.weights if not stored_q or w not in stored_q.weights] if target_q else []
    stored_specs, target_specs = layer_specs(config, stored, stored_q), layer_specs(config, target, target_q)
    gshapes, lshapes = global_shapes(config), layer_shapes(config)
    if shardings is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = {**{k: default for k in gshapes}, "layers": {k: default for k in lshapes}}
    missing = [k for k in gshapes if k not in shardings] + [
        f"layers/{k}" for k in lshapes if k not in shardings.get("layers", {})
    ]
    if missing:
        raise ValueError(f"shardings lacks an entry for {', '.join(missing)}")
    n = config.n_layers
    stacked_sh = {k: shardings["layers"][k] for k in lshapes}
    for name in target_q.weights if target_q else ():
        scale = name + SCALE_SUFFIX
        stacked_sh[scale] = scale_sharding(stacked_sh[name], (n, *target_specs[scale][0]))
    layer_sh = {k: layer_sharding(s) for k, s in stacked_sh.items()}

    ckpt = _checkpointer()
    try:
        params: dict[str, Any] = {}
        for k, shape in gshapes.items():
            params[k] = _restore(_global_dir(root, k), ckpt, {k: (shape, stored)}, shardings)[k].astype(target)

        def convert(layer: dict) -> dict:  # quantize and cast one layer, on device
            layer = dict(layer)
            for name in to_quantize:
                layer[name], layer[name + SCALE_SUFFIX] = quantize_array(layer[name], input_axes(name), target_q.mode)
            return {k: layer[k].astype(dt) for k, (_, dt) in target_specs.items()}

        def put(stack: dict, layer: dict, i: jax.Array) -> dict:
            layer = convert(layer)
            return {k: jax.lax.dynamic_update_index_in_dim(stack[k], layer[k], i, axis=0) for k in stack}

        if stacked:
            out: Any = jax.jit(
                lambda: {k: jnp.zeros((n, *s), dt) for k, (s, dt) in target_specs.items()}, out_shardings=stacked_sh
            )()
            update = jax.jit(put, donate_argnums=0, out_shardings=stacked_sh)
        else:
            out, update = [], jax.jit(convert, out_shardings=layer_sh)
        for i in tqdm(range(n), desc="restoring layers", unit="layer", disable=not progress):
            layer = _restore(_layer_dir(root, i), ckpt, stored_specs, layer_sh)
            if stacked:
                out = update(out, layer, jnp.int32(i))
            else:
                out.append(update(layer))
            del layer
    finally:
        ckpt.close()

    def wrap(layer: dict) -> dict:  # (value, scale) pairs as QuantizedWeights
        for name in target_q.weights if target_q else ():
            layer[name] = as_weight(layer[name], layer.pop(name + SCALE_SUFFIX))
        return layer

    params["layers"] = wrap(out) if stacked else tuple(wrap(layer) for layer in out)
    return params
