"""Benchmark llama-jax's Pallas attention kernels against the alternatives, at Llama 3.1 8B head shapes.

Prefill (causal, prompt from position 0) at 1k/4k/16k/32k tokens and decode (one token per
sequence) at batch 1/8/64 over 1k-128k cached tokens, for:
  pallas        our kernels through `kernels_pallas.attention`
  ours-mgpu     our Mosaic GPU (Hopper) prefill kernel `kernels_pallas.flash_attention_mgpu`
  xla           `llama_jax.attention.attention_reference` compiled by XLA
  cudnn         `jax.nn.dot_product_attention(implementation="cudnn")`
  jax-pallas    JAX's bundled Pallas GPU ops (`ops.gpu.attention.mha`, `ops.gpu.decode_attention.gqa`)
  tokamax-*     `tokamax.dot_product_attention` (mosaic, triton), when tokamax is installed
Prefill reports TFLOP/s (causal: 4*B*H*T*T*D/2), decode GB/s of K/V read, each also as a fraction
of a ceiling measured in the same run (a large bf16 matmul, a large device-to-device copy). Prints
a table and writes JSON (default benchmarks/kernels_<device>.json).

  python scripts/bench_kernels.py            # on the GPU machine
  python scripts/bench_kernels.py --quick    # only the sizes the targets name (a short GPU lease)
  python scripts/bench_kernels.py --smoke    # tiny sizes, Pallas interpret mode: checks it runs (CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kernels_pallas  # noqa: E402
from llama_jax.attention import attention_reference  # noqa: E402

# Llama 3.1 8B attention.
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = jnp.bfloat16


class Skip(Exception):
    """An implementation or configuration that cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Settings:
    smoke: bool
    interpret: bool  # Pallas interpret mode for our kernels and JAX's bundled ones
    reps: int
    min_rep_seconds: float  # back-to-back calls per timed repetition are batched up to this
    memory_bytes: int | None  # device memory limit, when the backend reports one


def time_call(fn: Callable[..., Any], args: tuple, settings: Settings) -> float:
    """Median seconds per call: compile and warm up, then `reps` repetitions, each timing enough
    back-to-back calls (async dispatch overlaps their launch overhead) to last min_rep_seconds."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    single = time.perf_counter() - start
    inner = max(1, min(100, int(settings.min_rep_seconds / max(single, 1e-7))))
    samples = []
    for _ in range(settings.reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def measure_ceilings(settings: Settings) -> dict[str, float]:
    """Achievable bf16 matmul TFLOP/s and copy GB/s (bytes read + written) on this device."""
    n = 256 if settings.smoke else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), DTYPE)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), DTYPE)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(DTYPE))
    matmul_s = time_call(matmul, (a, b), settings)

    elements = (1 << 20) if settings.smoke else (1 << 30)  # 2 GiB of bf16 on the GPU
    x = jnp.ones((elements,), DTYPE)
    copy = jax.jit(lambda t: t + jnp.asarray(1, DTYPE))  # elementwise: one read, one write
    copy_s = time_call(copy, (x,), settings)
    return {
        "matmul_tflops": 2 * n**3 / matmul_s / 1e12,
        "matmul_n": n,
        "copy_gbps": 2 * elements * x.dtype.itemsize / copy_s / 1e9,
        "copy_bytes": elements * x.dtype.itemsize,
    }


def _optional_import(name: str) -> Any:
    try:
        return __import__(name, fromlist=["_"])
    except Exception as exc:  # ImportError, or a GPU-only module failing to initialise
        raise Skip(f"{name} not importable: {type(exc).__name__}: {exc}") from None


def _require_gpu() -> None:
    if jax.default_backend() != "gpu":
        raise Skip("needs a CUDA GPU")


# Each builder takes (q, k, v, positions, settings) and returns (jitted fn, args) or raises Skip;
# preparation that is not part of the kernel (e.g. repeating K/V for an op without GQA) happens here,
# outside the timed call.
Builder = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, Settings], tuple[Callable[..., Any], tuple]]


def _pallas(q, k, v, positions, settings):
    fn = jax.jit(lambda *a: kernels_pallas.attention(*a, interpret=settings.interpret))
    return fn, (q, k, v, positions)


def _pallas_mgpu(q, k, v, positions, settings):
    if settings.interpret:  # every warpgroup of every block simulated: ~40 s a call at smoke size
        raise Skip("Mosaic GPU interpret mode is too slow to time; tests/test_kernels_mgpu.py checks it")

    def prefill(q, k, v, offsets):
        return kernels_pallas.flash_attention_mgpu(q, k, v, offsets, interpret=settings.interpret)

    return jax.jit(prefill), (q, k, v, positions[:, 0])


def _xla(q, k, v, positions, settings):
    scores_bytes = 10 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[1]  # f32 scores, f32 probs, bf16 probs
    if settings.memory_bytes and scores_bytes > 0.6 * settings.memory_bytes:
        raise Skip(f"materialises {scores_bytes / 2**30:.0f} GiB of scores")
    return jax.jit(attention_reference), (q, k, v, positions)


def _cudnn(q, k, v, positions, settings):
    _require_gpu()
    causal = q.shape[1] > 1  # prefill from position 0; decode sees the whole cache

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

    return jax.jit(cudnn), (q, k, v)


def _tokamax(implementation: str) -> Builder:
    def build(q, k, v, positions, settings):
        _require_gpu()
        tokamax = _optional_import("tokamax")
        causal = q.shape[1] > 1

        def attend(q, k, v):
            return tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)

        return jax.jit(attend), (q, k, v)

    return build


def _jax_pallas_prefill(q, k, v, positions, settings):
    ops = _optional_import("jax.experimental.pallas.ops.gpu.attention")
    group = q.shape[2] // k.shape[2]
    # mha has no GQA: K/V are repeated to all query heads once, outside the timing.
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    fn = jax.jit(
        lambda q, k, v: ops.mha(
            q, k, v, segment_ids=None, sm_scale=q.shape[-1] ** -0.5, causal=True, interpret=settings.interpret
        )
    )
    return fn, (q, k, v)


def _jax_pallas_decode(q, k, v, positions, settings):
    ops = _optional_import("jax.experimental.pallas.ops.gpu.decode_attention")
    cached = k.shape[1]
    # gqa needs cached % k_splits == 0 with whole 128-slot (or smaller) tiles per split.
    k_splits = 16 if cached >= 2048 else max(1, cached // 128)
    lengths = positions[:, 0] + 1

    def decode(q, k, v, lengths):
        out = ops.gqa(q[:, 0], k, v, kv_seq_len=lengths, k_splits=k_splits, interpret=settings.interpret)
        return out[:, None]

    return jax.jit(decode), (q, k, v, lengths)


PREFILL_IMPLS: dict[str, Builder] = {
    "pallas": _pallas,
    "ours-mgpu": _pallas_mgpu,
    "xla": _xla,
    "cudnn": _cudnn,
    "jax-pallas": _jax_pallas_prefill,
    "tokamax-mosaic": _tokamax("mosaic"),
    "tokamax-triton": _tokamax("triton"),
}
DECODE_IMPLS: dict[str, Builder] = {
    "pallas": _pallas,
    "xla": _xla,
    "cudnn": _cudnn,
    "jax-pallas": _jax_pallas_decode,
    "tokamax-mosaic": _tokamax("mosaic"),
    "tokamax-triton": _tokamax("triton"),
}


def _inputs(batch: int, tokens: int, cached: int, seed: int) -> tuple[jax.Array, ...]:
    """q (B, T, H, D), cache k, v (B, cached, K, D) and the positions of the last T slots."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (batch, tokens, HEADS, HEAD_DIM), DTYPE)
    k = jax.random.normal(kk, (batch, cached, KV_HEADS, HEAD_DIM), DTYPE)
    v = jax.random.normal(kv, (batch, cached, KV_HEADS, HEAD_DIM), DTYPE)
    positions = (cached - tokens) + jnp.arange(tokens, dtype=jnp.int32)[None, :].repeat(batch, axis=0)
    return q, k, v, positions


def run_config(
    kind: str,
    batch: int,
    tokens: int,
    cached: int,
    impls: dict[str, Builder],
    ceilings: dict[str, float],
    settings: Settings,
) -> list[dict[str, Any]]:
    """Time every implementation on one shape; outputs are compared with ours (tested separately)."""
    q, k, v, positions = _inputs(batch, tokens, cached, seed=tokens + cached + batch)
    if kind == "prefill":
        work = 4 * batch * HEADS * tokens * tokens * HEAD_DIM / 2  # causal FLOPs
        unit, ceiling = "TFLOP/s", ceilings["matmul_tflops"]
    else:
        work = 2 * batch * cached * KV_HEADS * HEAD_DIM * k.dtype.itemsize  # K and V bytes read
        unit, ceiling = "GB/s", ceilings["copy_gbps"]
    rows, ours = [], None
    for name, build in impls.items():
        row: dict[str, Any] = {"kind": kind, "impl": name, "batch": batch, "tokens": tokens, "cached": cached}
        try:
            fn, args = build(q, k, v, positions, settings)
            seconds = time_call(fn, args, settings)
            out = fn(*args).astype(jnp.float32)
        except Skip as exc:
            row["skipped"] = str(exc)
        except Exception as exc:  # OOM, unsupported shape or backend: record and go on
            row["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        else:
            rate = work / seconds / 1e12 if kind == "prefill" else work / seconds / 1e9
            if name == "pallas":
                ours = out
            row.update(ms=seconds * 1e3, rate=rate, unit=unit, of_ceiling=rate / ceiling)
            if ours is not None:
                row["max_abs_diff_vs_pallas"] = float(jnp.max(jnp.abs(out - ours)))
        # One line as each result comes, so a run stopped by a time limit still leaves what it measured.
        done = f"{row['ms']:.3f} ms, {row['rate']:.4g} {unit}" if "ms" in row else f"skipped: {row['skipped']}"
        print(f"  {kind} batch {batch} tokens {tokens} cached {cached} {name}: {done}", flush=True)
        rows.append(row)
    return rows


def _fits(batch: int, cached: int, settings: Settings) -> bool:
    kv_bytes = 2 * batch * cached * KV_HEADS * HEAD_DIM * jnp.dtype(DTYPE).itemsize
    return settings.memory_bytes is None or kv_bytes <= 0.45 * settings.memory_bytes


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'kind':8} {'batch':>5} {'tokens':>7} {'cached':>7}  {'impl':15} {'ms':>9} {'rate':>18} {'ceil%':>6}"
        f" {'diff':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        config = f"{r['kind']:8} {r['batch']:5d} {r['tokens']:7d} {r['cached']:7d}  {r['impl']:15}"
        if "skipped" in r:
            print(f"{config} skipped: {r['skipped']}")
        else:
            rate = f"{r['rate']:.4g} {r['unit']}"
            diff = r.get("max_abs_diff_vs_pallas")
            diff = "-" if diff is None else f"{diff:.2e}"
            print(f"{config} {r['ms']:9.3f} {rate:>18} {100 * r['of_ceiling']:5.1f}% {diff:>9}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, interpret mode (CPU, < 1 min)")
    parser.add_argument("--quick", action="store_true",
                        help="only the sizes the targets name: prefill at 8k tokens, decode at batch 1 and 8 over 32k")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/kernels_<device>.json)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per measurement (median)")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    settings = Settings(
        smoke=args.smoke,
        interpret=jax.default_backend() != "gpu",
        reps=3 if args.smoke else args.reps,
        min_rep_seconds=0.0 if args.smoke else 0.05,
        memory_bytes=stats.get("bytes_limit"),
    )
    if args.smoke:
        prefill_tokens, decode_batches, decode_cached = [48], [1, 2], [128]
    elif args.quick:
        prefill_tokens, decode_batches, decode_cached = [8192], [1, 8], [32768]
    else:
        prefill_tokens = [1024, 4096, 16384, 32768]
        decode_batches, decode_cached = [1, 8, 64], [1024, 4096, 16384, 32768, 65536, 131072]

    slug = re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_")
    out_path = args.out
    if out_path is None:  # a smoke run must not drop files into the tree
        out_dir = Path(tempfile.gettempdir()) if args.smoke else REPO / "benchmarks"
        out_path = out_dir / f"kernels_{slug}{'_smoke' if args.smoke else ''}.json"

    backend = jax.default_backend()
    print(f"device: {device.device_kind} ({backend}), jax {jax.__version__}, interpret={settings.interpret}")
    ceilings = measure_ceilings(settings)
    print(f"ceilings: {ceilings['matmul_tflops']:.4g} TFLOP/s bf16 matmul, {ceilings['copy_gbps']:.4g} GB/s copy")

    rows: list[dict[str, Any]] = []
    for tokens in prefill_tokens:
        rows += run_config("prefill", 1, tokens, tokens, PREFILL_IMPLS, ceilings, settings)
    for batch in decode_batches:
        for cached in decode_cached:
            if _fits(batch, cached, settings):
                rows += run_config("decode", batch, 1, cached, DECODE_IMPLS, ceilings, settings)
            else:
                config = {"kind": "decode", "impl": "*", "batch": batch, "tokens": 1, "cached": cached}
                rows.append(config | {"skipped": "K/V do not fit"})
    print_table(rows)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": device.device_kind,
        "backend": backend,
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "quick": args.quick,
        "interpret": settings.interpret,
        "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": jnp.dtype(DTYPE).name},
        "ceilings": ceilings,
        "results": rows,
    }
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
