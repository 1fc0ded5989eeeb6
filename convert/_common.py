"""What the three converters share: the error type, the source-layout shapes, the mapping from
"linear layout" weights (torch's (out_features, in_features)) to the internal layout, the rotary
un-interleaving, and the streaming write loop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

import numpy as np

from llama_jax.checkpoint import CheckpointWriter
from llama_jax.config import LlamaConfig
from llama_jax.quantization import SCALE_SUFFIX, WeightQuantization, quantize_layer, scale_shape

# dtype=None stores models below this many parameters in float32 (CPU-friendly), larger ones in bfloat16.
AUTO_FLOAT32_MAX_PARAMS = 2_000_000_000


# Linear-layout role -> internal layer weight, for the roles a pre-quantized source may give a scale.
LINEAR_WEIGHTS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}


class ConvertError(ValueError):
    """Bad converter input; the message names the file and tensor."""


def source_global_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Global tensors in linear layout; lm_head is left out when the embeddings are tied."""
    shapes = {"embed": (config.vocab_size, config.dim), "norm": (config.dim,)}
    if not config.tie_embeddings:
        shapes["lm_head"] = (config.vocab_size, config.dim)
    return shapes


def source_layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """One layer's tensors in linear layout: (out_features, in_features)."""
    d, f = config.dim, config.ffn_dim
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {
        "attn_norm": (d,),
        "q": (q, d),
        "k": (kv, d),
        "v": (kv, d),
        "o": (d, q),
        "mlp_norm": (d,),
        "gate": (f, d),
        "up": (f, d),
        "down": (d, f),
    }


def check_shape(where: str, name: str, shape: Iterable[int], expected: tuple[int, ...]) -> None:
    got = tuple(int(s) for s in shape)
    if got != expected:
        raise ConvertError(f"{where}: tensor {name} has shape {got}, but the config implies {expected}")


def interleaved_to_half_split(w: np.ndarray) -> np.ndarray:
    """Reorders the last (head_dim) axis from Meta's interleaved rotary pairs (2i, 2i+1) to the
    half-split pairs (i, i + Dh/2): interleaved index 2i + h moves to h * Dh/2 + i."""
    *lead, dh = w.shape
    return w.reshape(*lead, dh // 2, 2).swapaxes(-1, -2).reshape(*lead, dh)


def to_internal_layer(config: LlamaConfig, t: Mapping[str, np.ndarray], interleaved: bool) -> dict[str, np.ndarray]:
    """Linear-layout layer tensors (roles of source_layer_shapes) -> internal layout (checkpoint.LAYER_KEYS).
    A pre-quantized role also has a "<role>_scale" (out_features,) that becomes "<weight>_scale"."""
    d, h, k, dh = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
    wq = t["q"].T.reshape(d, h, dh)
    wk = t["k"].T.reshape(d, k, dh)
    if interleaved:
        wq, wk = interleaved_to_half_split(wq), interleaved_to_half_split(wk)
    out = {
        "attn_norm": t["attn_norm"],
        "wq": wq,
        "wk": wk,
        "wv": t["v"].T.reshape(d, k, dh),
        "wo": t["o"].T.reshape(h, dh, d),
        "mlp_norm": t["mlp_norm"],
        "w_gate": t["gate"].T,
        "w_up": t["up"].T,
        "w_down": t["down"].T,
    }
    for role, name in LINEAR_WEIGHTS.items():
        if role + SCALE_SUFFIX in t:  # output features, in the order the internal output axes flatten
            out[name + SCALE_SUFFIX] = t[role + SCALE_SUFFIX].reshape(scale_shape(name, out[name].shape))
    return out


def to_internal_global(role: str, t: np.ndarray) -> np.ndarray:
    """Linear-layout global tensor -> internal layout: lm_head (V, D) becomes (D, V)."""
    return t.T if role == "lm_head" else t


def torch_to_numpy(t: Any) -> np.ndarray:
    """A CPU torch tensor as numpy without widening (bfloat16 and float8_e4m3fn become their
    ml_dtypes types)."""
    import ml_dtypes
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


class Source(Protocol):
    """An opened, validated source checkpoint: tensors in linear layout, read on demand."""

    kind: str  # "hf" | "meta" | "gguf"
    config: LlamaConfig
    interleaved: bool  # Q/K rows in Meta's interleaved rotary layout

    def read_global(self, role: str) -> np.ndarray: ...
    def read_layer(self, i: int) -> dict[str, np.ndarray]: ...
    def files_to_copy(self) -> list[Path]: ...
    def json_files(self) -> dict[str, Any]: ...


def write_checkpoint(
    source: Source, dst: str | os.PathLike, dtype: str | None, overwrite: bool, progress: bool,
    quantize: str | None = None,
) -> Path:
    """Streams a source into a checkpoint: one global tensor or one layer in host memory at a time.
    dtype None picks float32 below AUTO_FLOAT32_MAX_PARAMS parameters, else bfloat16.

    `quantize` ("int8" | "fp8") stores every layer weight quantized. A pre-quantized source (an
    HF FP8 checkpoint, with a `quantization` attribute) keeps its quantized weights as they are."""
    from tqdm.auto import tqdm

    config = source.config
    if dtype is None:
        dtype = "float32" if config.num_params() < AUTO_FLOAT32_MAX_PARAMS else "bfloat16"
    roles = list(source_global_shapes(config))
    spec: WeightQuantization | None = getattr(source, "quantization", None)
    if quantize is not None:
        try:
            spec = spec.widen(quantize) if spec else WeightQuantization(quantize)
        except ValueError as e:
            raise ConvertError(f"--quantize {quantize}: {e}") from None
    with CheckpointWriter(dst, config, dtype, source.kind, overwrite=overwrite, quantization=spec) as writer:
        with tqdm(total=len(roles) + config.n_layers, desc=f"converting {source.kind}", unit="tensor/layer",
                  disable=not progress) as bar:
            for role in roles:
                writer.write_global(role, to_internal_global(role, source.read_global(role)))
                bar.update()
            for i in range(config.n_layers):
                layer = to_internal_layer(config, source.read_layer(i), source.interleaved)
                writer.write_layer(i, quantize_layer(layer, spec) if spec else layer)
                bar.update()
        for path in source.files_to_copy():
            writer.copy_file(path)
        for name, obj in source.json_files().items():
            writer.write_json(name, obj)
    return writer.dst
