"""Checkpoint converters: Hugging Face safetensors, Meta consolidated.NN.pth and GGUF files into
the llama-jax Orbax format (llama_jax.checkpoint). Each reads and writes one layer at a time.

    from convert import convert
    convert("hf", "Llama-3.1-8B-Instruct/", "ckpt/llama3.1-8b", dtype="bfloat16")

Command line: python -m convert {hf,meta,gguf} SRC DST [--dtype bfloat16|float32] [--quantize int8|fp8]
              [--overwrite]
"""

from __future__ import annotations

import os
from pathlib import Path

from convert._common import ConvertError

FORMATS = ("hf", "meta", "gguf")


def convert(
    source_format: str,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str | None = "bfloat16",
    overwrite: bool = False,
    progress: bool = True,
    quantize: str | None = None,
) -> Path:
    """Converts `src` (format "hf", "meta" or "gguf") into a checkpoint at `dst`; returns its path.

    dtype: "bfloat16", "float32", or None for float32 below 2B parameters and bfloat16 above.
    quantize: "int8" or "fp8" stores the layer weights quantized (llama_jax/quantization.py);
    pre-quantized FP8 HF checkpoints keep their FP8 weights either way."""
    if source_format == "hf":
        from convert.hf import convert_hf as run
    elif source_format == "meta":
        from convert.meta import convert_meta as run
    elif source_format == "gguf":
        from convert.gguf import convert_gguf as run
    else:
        raise ConvertError(f"unknown source format {source_format!r}; expected one of {', '.join(FORMATS)}")
    return run(src, dst, dtype=dtype, overwrite=overwrite, progress=progress, quantize=quantize)


__all__ = ["FORMATS", "ConvertError", "convert"]
