"""Hugging Face Llama checkpoints: a directory with config.json and model.safetensors, or
shards listed in model.safetensors.index.json. HF already uses the half-split rotary layout.

Pre-quantized FP8 checkpoints (quantization_config.quant_method "fbgemm_fp8", as Meta's
Llama-3.1-*-FP8, or "compressed-tensors" with float8 weights) are read as published: a linear
layer's `weight` in float8_e4m3fn with a float32 `weight_scale` per output row ((out, 1)) or per
tensor, the layers left unconverted in bfloat16. The FP8 bytes go to the checkpoint unchanged.
The layer stack needs one type per weight, so where a weight is FP8 in some layers and not in
others (Meta keeps the first and last layers' MLP in bfloat16), those layers are quantized to FP8
(per-channel) here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from convert._common import (
    LINEAR_WEIGHTS,
    ConvertError,
    check_shape,
    source_global_shapes,
    source_layer_shapes,
    torch_to_numpy,
    write_checkpoint,
)
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.quantization import SCALE_SUFFIX, WeightQuantization

COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)
_GLOBAL_NAMES = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}


_FP8_METHODS = ("fbgemm_fp8", "compressed-tensors")
_FLOAT_DTYPES = ("F32", "BF16", "F16")  # safetensors dtype names of unquantized tensors


def _layer_name(i: int, role: str) -> str:
    return f"model.layers.{i}.{_LAYER_NAMES[role]}"


def _scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX  # "...q_proj.weight" -> "...q_proj.weight_scale"


class HFSource:
    kind = "hf"
    interleaved = False
    quantization: WeightQuantization | None = None  # FP8 weights of a pre-quantized checkpoint

    def __init__(self, src: str | os.PathLike) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        self.dir = Path(src)
        if not self.dir.is_dir():
            raise ConvertError(f"{self.dir}: not a directory (expected a Hugging Face model directory)")
        config_file = self.dir / "config.json"
        try:
            self.config = LlamaConfig.from_hf(config_file)
        except ConfigError as e:
            msg = str(e)
            raise ConvertError(msg if msg.startswith(str(config_file)) else f"{config_file}: {msg}") from None
        self._check_quantization_config(config_file)
        self._file_of = self._weight_map()
        self._fp8: set[str] = set()  # names of the weights stored in float8_e4m3fn (with a weight_scale)
        self._check_inventory()
        fp8_weights = {LINEAR_WEIGHTS[role] for i in range(self.config.n_layers) for role in LINEAR_WEIGHTS
                       if _layer_name(i, role) in self._fp8}
        if fp8_weights:
            self.quantization = WeightQuantization("fp8", tuple(fp8_weights))

    @staticmethod
    def _check_quantization_config(config_file: Path) -> None:
        qc = json.loads(config_file.read_text()).get("quantization_config")
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        if qc is not None and method not in _FP8_METHODS:
            raise ConvertError(f"{config_file}: quantization_config.quant_method={method!r} is not supported; "
                               f"pre-quantized checkpoints must be FP8 in one of {', '.join(_FP8_METHODS)}")

    def _weight_map(self) -> dict[str, Path]:
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConvertError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
            return {name: self.dir / file for name, file in weight_map.items()}
        if single.exists():
            with self._open(single) as f:
                return {name: single for name in f.keys()}
        raise ConvertError(
            f"{self.dir}: no model.safetensors or model.safetensors.index.json (only safetensors weights are supported)"
        )

    def _open(self, file: Path) -> Any:
        if not file.exists():
            raise ConvertError(f"{file}: missing (listed in model.safetensors.index.json)")
        try:
            return self._safe_open(str(file), framework="pt")
        except Exception as e:  # SafetensorError for truncated or corrupt files
            raise ConvertError(f"{file}: not a readable safetensors file ({e})") from None

    def _needed(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name we read, with its expected shape."""
        g = source_global_shapes(self.config)
        needed = {_GLOBAL_NAMES[role]: shape for role, shape in g.items()}
        for i in range(self.config.n_layers):
            for role, shape in source_layer_shapes(self.config).items():
                needed[_layer_name(i, role)] = shape
        return needed

    def _check_inventory(self) -> None:
        """All tensors present with the right shapes, before anything is written."""
        needed = self._needed()
        missing = [name for name in needed if name not in self._file_of]
        if missing:
            raise ConvertError(f"{self.dir}: tensor {missing[0]} is missing from the checkpoint"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        linear = {_layer_name(i, role) for i in range(self.config.n_layers) for role in LINEAR_WEIGHTS}
        scales: dict[str, int] = {}  # weight_scale name -> output features of its weight
        for file, names in self._by_file(needed).items():
            with self._open(file) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise ConvertError(f"{file}: tensor {name} is missing (the index lists it in this file)")
                    tensor = f.get_slice(name)
                    check_shape(str(file), name, tensor.get_shape(), needed[name])
                    dtype = tensor.get_dtype()
                    if dtype == "F8_E4M3" and name in linear:
                        self._fp8.add(name)
                        scales[_scale_name(name)] = needed[name][0]
                    elif dtype not in _FLOAT_DTYPES:
                        raise ConvertError(f"{file}: tensor {name} is stored as {dtype}; supported are floating-point "
                                           "tensors and F8_E4M3 linear-layer weights with a weight_scale")
        missing = [name for name in scales if name not in self._file_of]
        if missing:
            raise ConvertError(f"{self.dir}: FP8 weight {missing[0][:-len(SCALE_SUFFIX)]} has no {missing[0]}")
        for file, names in self._by_file(scales).items():
            with self._open(file) as f:
                for name in names:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape not in ((scales[name], 1), (scales[name],), (1,), ()):
                        raise ConvertError(f"{file}: tensor {name} has shape {shape}; supported are one scale per "
                                           f"output row ({scales[name]}, 1) or per tensor (block scales are not)")

    def _by_file(self, names: Any) -> dict[Path, list[str]]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file_of[name], []).append(name)
        return by_file

    def _read(self, names: dict[str, str]) -> dict[str, np.ndarray]:
        """role -> tensor name, read file by file; each file is opened (mapped) only while read."""
        by_file: dict[Path, list[str]] = {}
        for role in names:
            by_file.setdefault(self._file_of[names[role]], []).append(role)
        out = {}
        for file, roles in by_file.items():
            with self._open(file) as f:
                for role in roles:
                    out[role] = torch_to_numpy(f.get_tensor(names[role]))
        return out

    def read_global(self, role: str) -> np.ndarray:
        return self._read({role: _GLOBAL_NAMES[role]})[role]

    def read_layer(self, i: int) -> dict[str, np.ndarray]:
        """The layer's tensors; an FP8 weight comes with "<role>_scale", float32 per output row."""
        names = {role: _layer_name(i, role) for role in _LAYER_NAMES}
        names |= {role + SCALE_SUFFIX: _scale_name(names[role]) for role in LINEAR_WEIGHTS if names[role] in self._fp8}
        t = self._read(names)
        for role in LINEAR_WEIGHTS:
            if role + SCALE_SUFFIX in t:  # (out, 1), (out,), (1,) or () -> (out,)
                scale = t[role + SCALE_SUFFIX].astype(np.float32).reshape(-1)
                t[role + SCALE_SUFFIX] = np.broadcast_to(scale, t[role].shape[:1])
        return t

    def files_to_copy(self) -> list[Path]:
        return [self.dir / name for name in COPIED_FILES if (self.dir / name).is_file()]

    def json_files(self) -> dict[str, Any]:
        return {}


def convert_hf(
    src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = "bfloat16", overwrite: bool = False,
    progress: bool = True, quantize: str | None = None,
) -> Path:
    """Converts a Hugging Face Llama directory (safetensors) into a llama-jax checkpoint at `dst`."""
    return write_checkpoint(HFSource(src), dst, dtype, overwrite, progress, quantize)
