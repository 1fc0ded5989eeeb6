"""Plan device memory for a model on a mesh, without allocating anything.

    python scripts/plan.py --model llama3.1-405b --mesh tp=8 --dtype bfloat16 \
        --max-seq 131072 --batch 4 --device-memory 80GB

Compiles the decode step ahead of time on abstract shapes over simulated CPU devices (as
many as the mesh needs) and prints per-device bytes for weights, KV cache and temporaries,
and whether they fit. `--model` is a preset name or a llama-jax checkpoint directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="preset (e.g. llama3.1-8b) or a llama-jax checkpoint directory")
    p.add_argument("--mesh", default="tp=1", help="mesh spec, e.g. tp=8 or dp=2,tp=8")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--quantize", default=None, choices=("int8", "fp8"), help="8-bit layer weights")
    p.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: the untied LM head too")
    p.add_argument("--cache-dtype", default=None, choices=("bfloat16", "float32", "int8"),
                   help="KV cache dtype (default: --dtype)")
    p.add_argument("--max-seq", type=int, default=None, help="KV cache length per slot (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="decode slots")
    p.add_argument("--device-memory", default="80GB", help="memory per device, e.g. 80GB (H100), 141GB (H200)")
    p.add_argument("--usable-fraction", type=float, default=0.95,
                   help="share of device memory JAX may use (set XLA_PYTHON_CLIENT_MEM_FRACTION to match)")
    p.add_argument("--attention", default="xla", choices=("xla", "pallas"))
    p.add_argument("--prefill-chunk", type=int, default=1024, help="largest prefill bucket")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled figures (analytic only)")
    p.add_argument("--json", type=Path, help="also write the plan as JSON here")
    return p.parse_args(argv)


def _simulate_devices(n: int) -> None:
    """Give this process n CPU devices. XLA reads these when JAX starts its backend, which has
    not happened yet: nothing has asked for a device."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    sizes = [int(s) for s in re.findall(r"=\s*(\d+)", args.mesh)]
    _simulate_devices(max(1, math.prod(sizes)))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llama_jax import checkpoint
    from llama_jax.config import PRESETS, LlamaConfig
    from llama_jax.planner import plan

    if args.model in PRESETS:
        config = LlamaConfig.from_preset(args.model)
    elif checkpoint.is_checkpoint(args.model):
        config = checkpoint.read_config(args.model)
    else:
        print(f"--model {args.model!r}: not a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint", file=sys.stderr)
        return 2
    result = plan(
        config, args.mesh, dtype=args.dtype, quantize=args.quantize, quantize_lm_head=args.quantize_lm_head,
        cache_dtype=args.cache_dtype,
        max_seq_len=args.max_seq, batch=args.batch,
        device_memory=args.device_memory, usable_fraction=args.usable_fraction, attention=args.attention,
        prefill_chunk=args.prefill_chunk, compile=not args.no_compile, name=args.model,
    )
    print(result.report())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
