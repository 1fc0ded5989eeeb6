"""python -m convert {hf,meta,gguf} SRC DST [--dtype bfloat16|float32] [--quantize int8|fp8] [--overwrite]"""

from __future__ import annotations

import argparse
import sys

from convert import FORMATS, ConvertError, convert
from llama_jax.checkpoint import DTYPES, CheckpointError
from llama_jax.config import ConfigError
from llama_jax.quantization import MODES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llama-jax-convert",
        description="Convert a Llama checkpoint (Hugging Face safetensors, Meta .pth, GGUF) to the llama-jax format.",
    )
    parser.add_argument("format", choices=FORMATS, help="source format")
    parser.add_argument("src", help="source: HF or Meta model directory, or a .gguf file")
    parser.add_argument("dst", help="destination checkpoint directory (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="stored dtype (default: bfloat16)")
    parser.add_argument("--quantize", choices=MODES, default=None,
                        help="store the layer weights quantized: int8, or fp8 (float8_e4m3fn), with one scale per "
                             "output channel (default: as the source has them)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing llama-jax checkpoint at DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        dst = convert(args.format, args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                      progress=not args.no_progress, quantize=args.quantize)
    except (ConvertError, CheckpointError, ConfigError, OSError) as e:
        print(f"llama-jax-convert: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 1
    except KeyboardInterrupt:
        print("llama-jax-convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
