"""GGUF (llama.cpp) files: dequantised to float32 tensor by tensor.

GGUF lists dimensions fastest-first (ne[0] is the contiguous axis), so a weight stored with
ne = [in, out] is, in numpy's order, the (out, in) linear layout. llama.cpp's converter
permutes the Q and K rows of each head into Meta's interleaved rotary layout; we undo that.
Llama 3.1 files carry their rotary scaling as a `rope_freqs.weight` tensor of per-frequency
divisors instead of metadata; it is checked against the "llama3" formula and turned into a
RopeScaling.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from convert._common import ConvertError, check_shape, source_global_shapes, source_layer_shapes, write_checkpoint
from llama_jax.tokenizer import GGUF_TOKENIZER_FILE
from llama_jax.config import ConfigError, LlamaConfig, RopeScaling

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
_GLOBAL_NAMES = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}
_LAYER_NAMES = {
    "attn_norm": "attn_norm.weight",
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "o": "attn_output.weight",
    "mlp_norm": "ffn_norm.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
}
_ROPE_FREQS = "rope_freqs.weight"


def read_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key/value metadata as plain Python values (str, int, float, bool, lists of them)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def llama3_rope_divisors(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """Per-frequency divisors of the "llama3" scaling, as llama.cpp stores them in rope_freqs.weight."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for j in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (j / head_dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.asarray(out, np.float32)


def tokenizer_json(fields: dict[str, Any], source_name: str) -> dict[str, Any]:
    """The gguf_tokenizer.json document (format documented in llama_jax.checkpoint)."""
    metadata = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    return {"format": "gguf-tokenizer", "version": 1, "source": source_name, "metadata": metadata}


class GGUFSource:
    kind = "gguf"
    interleaved = True  # llama.cpp stores Q/K in Meta's interleaved rotary layout

    def __init__(self, src: str | os.PathLike) -> None:
        import gguf

        self._gguf = gguf
        self.path = Path(src)
        if not self.path.is_file():
            raise ConvertError(f"{self.path}: {'is a directory, expected' if self.path.is_dir() else 'missing,'} "
                               "a .gguf file")
        try:
            reader = gguf.GGUFReader(self.path)
            fields = read_metadata(reader)
        except Exception as e:  # the reader raises assorted errors for truncated or foreign files
            raise ConvertError(f"{self.path}: not a readable GGUF file, truncated or corrupt "
                               f"({type(e).__name__}: {e})") from None
        if reader.byte_order != "I":
            raise ConvertError(f"{self.path}: big-endian GGUF files are not supported")
        self.tensors = {t.name: t for t in reader.tensors}
        try:
            config = LlamaConfig.from_gguf(fields, has_output_tensor=_GLOBAL_NAMES["lm_head"] in self.tensors)
        except ConfigError as e:
            raise ConvertError(f"{self.path}: {e}") from None
        rope_dims = fields.get("llama.rope.dimension_count")
        if rope_dims is not None and rope_dims != config.head_dim:
            raise ConvertError(f"{self.path}: llama.rope.dimension_count={rope_dims} differs from head_dim="
                               f"{config.head_dim}; partial rotary embeddings are not supported")
        self.config = self._rope_scaling(config, fields)
        self._check_inventory()
        self._tokenizer = tokenizer_json(fields, self.path.name) if "tokenizer.ggml.tokens" in fields else None

    def _rope_scaling(self, config: LlamaConfig, fields: dict[str, Any]) -> LlamaConfig:
        t = self.tensors.get(_ROPE_FREQS)
        if t is None:
            return config
        divisors = self._load(t).reshape(-1)
        if divisors.shape != (config.head_dim // 2,):
            raise ConvertError(f"{self.path}: tensor {_ROPE_FREQS} has {divisors.size} values, expected "
                               f"head_dim/2 = {config.head_dim // 2}")
        if np.allclose(divisors, 1.0):
            return config
        scaling = config.rope_scaling or RopeScaling(
            factor=float(divisors.max()),
            original_max_position_embeddings=int(fields.get("llama.rope.scaling.original_context_length", 8192)),
        )
        expected = llama3_rope_divisors(config.head_dim, config.rope_theta, scaling)
        if not np.allclose(divisors, expected, rtol=1e-3):
            raise ConvertError(f"{self.path}: tensor {_ROPE_FREQS} does not match the 'llama3' rotary scaling "
                               f"(factor {scaling.factor}); other frequency scalings are not supported")
        return config.replace(rope_scaling=scaling)

    def _names(self) -> list[tuple[str, tuple[int, ...]]]:
        out = [(_GLOBAL_NAMES[role], shape) for role, shape in source_global_shapes(self.config).items()]
        for i in range(self.config.n_layers):
            out += [(f"blk.{i}.{_LAYER_NAMES[role]}", shape) for role, shape in source_layer_shapes(self.config).items()]
        return out

    def _check_inventory(self) -> None:
        for name, shape in self._names():
            t = self.tensors.get(name)
            if t is None:
                raise ConvertError(f"{self.path}: tensor {name} is missing")
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise ConvertError(f"{self.path}: tensor {name} has type {t.tensor_type.name}, which is not "
                                   f"supported (supported: {', '.join(SUPPORTED_TYPES)})")
            check_shape(str(self.path), name, reversed(t.shape.tolist()), shape)

    def _load(self, t: Any) -> np.ndarray:
        """Reads the bytes with plain file I/O rather than through the reader's memory map, so the
        pages of converted tensors do not stay mapped into this process."""
        with open(self.path, "rb") as f:
            f.seek(t.data_offset)
            raw = np.fromfile(f, dtype=np.uint8, count=t.n_bytes)
        if raw.size != t.n_bytes:
            raise ConvertError(f"{self.path}: truncated: tensor {t.name} extends past the end of the file")
        data = raw.view(t.data.dtype).reshape(t.data.shape)  # the reader's view: elements, or bytes per row
        out = self._gguf.quants.dequantize(data, t.tensor_type)
        return out.reshape(tuple(reversed(t.shape.tolist())))

    def read_global(self, role: str) -> np.ndarray:
        return self._load(self.tensors[_GLOBAL_NAMES[role]])

    def read_layer(self, i: int) -> dict[str, np.ndarray]:
        return {role: self._load(self.tensors[f"blk.{i}.{name}"]) for role, name in _LAYER_NAMES.items()}

    def files_to_copy(self) -> list[Path]:
        return []

    def json_files(self) -> dict[str, Any]:
        return {} if self._tokenizer is None else {GGUF_TOKENIZER_FILE: self._tokenizer}


def convert_gguf(
    src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = "bfloat16", overwrite: bool = False,
    progress: bool = True, quantize: str | None = None,
) -> Path:
    """Converts a llama.cpp GGUF file into a llama-jax checkpoint at `dst` (the .gguf is not copied)."""
    return write_checkpoint(GGUFSource(src), dst, dtype, overwrite, progress, quantize)
