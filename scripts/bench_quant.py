#!/usr/bin/env python
"""Quantized weights and KV cache: decode speed on random weights, and quality on the demo model.

    python scripts/bench_quant.py speed              # GPU: 8B-shaped random weights, batch 1 and 16
    python scripts/bench_quant.py speed --smoke      # any machine: a tiny config, a few steps
    python scripts/bench_quant.py quality            # the demo model (CPU is fine): KL, top-1, greedy match

speed: decode tokens/s of the engine (multi-step decode, greedy) for bfloat16, int8 and fp8 layer
weights (and, where the GPU multiplies float8 natively, fp8 weights with the matmul in float8),
with the bytes a decode step reads (weights + the attended KV window) over the step time, as a
fraction of the device's copy bandwidth measured in the same run.

quality: against the float32 model over a fixed text, per variant (int8 / fp8 weights, fp8 with
float8 activations as on Hopper, int8 KV cache): mean and max KL(reference || variant) of the
next-token distributions, top-1 agreement, and how many greedy tokens match the reference's.

Prints a table and writes JSON under benchmarks/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llama_jax import quantization  # noqa: E402
from llama_jax.config import LlamaConfig  # noqa: E402
from llama_jax.engine import Engine  # noqa: E402
from llama_jax.model import KVCache, Params, forward, param_shapes  # noqa: E402
from llama_jax.sampling import SamplingParams  # noqa: E402

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
    "faster than scribes. Within fifty years presses were running in more than two hundred European cities, "
    "and the price of books fell sharply. Cheaper books spread literacy, standardised spelling and helped "
    "scientists share results quickly, so that an experiment done in one country could be checked in another "
    "within months. Historians still debate how much the press caused these changes and how much it merely "
    "sped up trends that were already under way, but few doubt that it changed how knowledge travels."
)
PROMPT = "Explain in a few sentences why the sky is blue."


# ---------------------------------------------------------------- speed


def random_params(config: LlamaConfig, dtype: Any) -> Params:
    """Random weights straight in `dtype`, one tensor at a time (no float32 copy of the model)."""
    shapes = param_shapes(config)
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    make = jax.jit(lambda k, shape: jax.random.normal(k, shape, dtype) * 0.02, static_argnums=1)
    return jax.tree.unflatten(tree, [make(k, s) for k, s in zip(keys, leaves)])


def copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Bytes/s moved by an elementwise op over a large array (read + write), best of several runs."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best


def weight_bytes_per_step(params: Params, config: LlamaConfig) -> int:
    """Bytes of weights a decode step reads: every layer weight and the LM head (embeddings are gathered)."""
    head = params["embed"] if config.tie_embeddings else params["lm_head"]
    return sum(a.nbytes for a in jax.tree.leaves(params["layers"])) + head.nbytes


def time_decode(config: LlamaConfig, params: Params, batch: int, cache_dtype: Any, prompt_len: int,
                steps: int, calls: int) -> dict[str, float]:
    """Decode tokens/s with `batch` busy slots, after a warm-up call (compilation)."""
    engine = Engine(config, params, max_slots=batch, max_seq_len=prompt_len + steps * (calls + 2),
                    prefill_buckets=(prompt_len,), decode_steps=steps, cache_dtype=cache_dtype)
    rng = np.random.default_rng(0)
    for slot in range(batch):
        engine.prefill(slot, rng.integers(0, config.vocab_size, prompt_len).tolist(), SamplingParams.greedy(), 0)
    engine.decode()
    jax.block_until_ready(engine.cache)
    start = time.perf_counter()
    for _ in range(calls):
        engine.decode()  # returns tokens on the host: each call waits for its step
    elapsed = time.perf_counter() - start
    window = engine.kv_window_for(max(p for p in engine.slot_pos if p is not None))
    kv_per_token = sum(a.nbytes for a in jax.tree.leaves(engine.cache)) / engine.max_seq_len  # all layers and slots
    return {"tok_s": batch * steps * calls / elapsed, "step_s": elapsed / (steps * calls),
            "kv_bytes_per_step": kv_per_token * window}


def speed(args: argparse.Namespace) -> dict[str, Any]:
    config = LlamaConfig.from_preset("tiny" if args.smoke else args.model)
    batches = [1] if args.smoke else args.batch
    steps, calls = (2, 2) if args.smoke else (args.steps, args.calls)
    base = random_params(config, jnp.bfloat16)
    quantize = jax.jit(quantization.quantize_params, static_argnums=1)
    variants = {"bfloat16": base, "int8": quantize(base, "int8"), "fp8": _with_fp8_matmul(quantize(base, "fp8"), False)}
    if quantization.fp8_matmul_supported() or args.smoke:  # CPUs emulate it: the smoke run checks the path
        variants["fp8, float8 matmul"] = _with_fp8_matmul(variants["fp8"], True)
    bandwidth = copy_bandwidth(min(1 << 30, 4 * weight_bytes_per_step(base, config)))
    rows = []
    for name, params in variants.items():
        wbytes = weight_bytes_per_step(params, config)
        for b in batches:
            r = time_decode(config, params, b, args.cache_dtype, args.prompt_len, steps, calls)
            achieved = (wbytes + r["kv_bytes_per_step"]) / r["step_s"]
            rows.append({"weights": name, "batch": b, "weight_bytes": wbytes, **r,
                         "achieved_bytes_s": achieved, "bandwidth_fraction": achieved / bandwidth})
            print(f"  {name}, batch {b}: {r['tok_s']:.1f} tok/s", flush=True)  # progress, in case of a time limit
    for r in rows:
        ref = next(x for x in rows if x["weights"] == "bfloat16" and x["batch"] == r["batch"])
        r["speedup_vs_bf16"] = r["tok_s"] / ref["tok_s"]

    print(f"\n{'tiny' if args.smoke else args.model} decode on {jax.devices()[0].device_kind}; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; KV cache {jnp.dtype(args.cache_dtype).name}")
    print(f"{'weights':<24}{'batch':>6}{'MB read/step':>14}{'tok/s':>10}{'vs bf16':>9}{'of bandwidth':>14}")
    for r in rows:
        print(f"{r['weights']:<24}{r['batch']:>6}{(r['weight_bytes'] + r['kv_bytes_per_step']) / 1e6:>14.1f}"
              f"{r['tok_s']:>10.1f}{r['speedup_vs_bf16']:>8.2f}x{r['bandwidth_fraction']:>13.0%}")
    return {"model": "tiny" if args.smoke else args.model, "cache_dtype": jnp.dtype(args.cache_dtype).name,
            "copy_bandwidth_bytes_s": bandwidth, "decode_steps_per_call": steps, "calls": calls, "rows": rows}


def _with_fp8_matmul(params: Params, enabled: bool) -> Params:
    layers = {k: dataclasses.replace(w, fp8_matmul=enabled) if isinstance(w, quantization.QuantizedWeight) else w
              for k, w in params["layers"].items()}
    return {**params, "layers": layers}


# ---------------------------------------------------------------- quality


def kl_stats(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Mean and max over positions of KL(ref || got) in nats, and top-1 agreement; logits (T, V)."""
    lp = jax.nn.log_softmax(jnp.asarray(ref, jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(jnp.asarray(got, jnp.float32), axis=-1)
    kl = np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1))
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float(np.mean(np.argmax(ref, -1) == np.argmax(got, -1)))}


def text_logits(config: LlamaConfig, params: Params, tokens: list[int], cache_dtype: Any = jnp.float32) -> np.ndarray:
    """Teacher-forced float32 logits (T, V); an int8 cache quantizes the keys and values attended."""
    t = jnp.asarray([tokens], jnp.int32)
    pos = jnp.arange(len(tokens), dtype=jnp.int32)[None]
    run = jax.jit(lambda p: forward(p, config, t, pos, KVCache.zeros(config, 1, len(tokens), cache_dtype))[0])
    return np.asarray(run(params)[0])


def greedy_tokens(config: LlamaConfig, params: Params, prompt: list[int], n: int, cache_dtype: Any) -> list[int]:
    engine = Engine(config, params, max_slots=1, max_seq_len=len(prompt) + n + 16, decode_steps=8,
                    prefill_buckets=(len(prompt),), cache_dtype=cache_dtype)
    out = [int(engine.prefill(0, prompt, SamplingParams.greedy(), 0).tokens[0, 0])]
    while len(out) < n:
        out += engine.decode().tokens[:, 0].tolist()
    return out[:n]


def quality(args: argparse.Namespace) -> dict[str, Any]:
    from llama_jax import checkpoint
    from llama_jax.chat_format import chat_format_for
    from llama_jax.sources import resolve_checkpoint
    from llama_jax.tokenizer import load_tokenizer

    ckpt = resolve_checkpoint(args.ckpt, progress=False)
    config = checkpoint.read_config(ckpt)
    tokenizer = load_tokenizer(ckpt)
    tokens = tokenizer.encode(TEXT)[: args.tokens]
    prompt = chat_format_for(tokenizer).encode_dialog([{"role": "user", "content": PROMPT}])
    ref = checkpoint.restore_params(ckpt, dtype="float32", progress=False)
    int8 = checkpoint.restore_params(ckpt, dtype="float32", progress=False, quantize="int8")
    fp8 = checkpoint.restore_params(ckpt, dtype="float32", progress=False, quantize="fp8")
    variants = {  # name -> (params, KV cache dtype)
        "int8 weights": (int8, jnp.float32),
        "fp8 weights": (_with_fp8_matmul(fp8, False), jnp.float32),
        "fp8 weights, float8 matmul": (_with_fp8_matmul(fp8, True), jnp.float32),
        "int8 KV cache": (ref, jnp.int8),
        "int8 weights + int8 KV cache": (int8, jnp.int8),
    }
    ref_logits = text_logits(config, ref, tokens)
    ref_greedy = greedy_tokens(config, ref, prompt, args.greedy, jnp.float32)
    rows = []
    for name, (params, cache_dtype) in variants.items():
        got = greedy_tokens(config, params, prompt, args.greedy, cache_dtype)
        match = next((i for i, (a, b) in enumerate(zip(ref_greedy, got)) if a != b), len(got))
        rows.append({"variant": name, **kl_stats(ref_logits, text_logits(config, params, tokens, cache_dtype)),
                     "greedy_match": match, "greedy_tokens": args.greedy})

    print(f"\n{Path(ckpt).name} (float32 reference), {len(tokens)} text tokens, {args.greedy} greedy tokens")
    print(f"{'variant':<32}{'mean KL':>10}{'max KL':>10}{'top-1':>8}{'greedy match':>14}")
    for r in rows:
        print(f"{r['variant']:<32}{r['kl_mean']:>10.5f}{r['kl_max']:>10.4f}{r['top1_agreement']:>8.1%}"
              f"{r['greedy_match']:>8}/{r['greedy_tokens']}")
    return {"model": Path(ckpt).name, "text_tokens": len(tokens), "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("speed", "quality"))
    p.add_argument("--smoke", action="store_true", help="speed: a tiny config and a few steps (quick, any machine)")
    p.add_argument("--model", default="llama3.1-8b", help="speed: config preset of the random weights")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="speed: decode batch sizes")
    p.add_argument("--steps", type=int, default=16, help="speed: decode steps per engine call")
    p.add_argument("--calls", type=int, default=8, help="speed: timed engine calls")
    p.add_argument("--prompt-len", type=int, default=32, help="speed: prompt tokens per slot")
    p.add_argument("--cache-dtype", default="bfloat16", help="speed: KV cache dtype (bfloat16 or int8)")
    p.add_argument("--ckpt", help="quality: checkpoint or source (default: the demo model)")
    p.add_argument("--tokens", type=int, default=256, help="quality: text tokens scored")
    p.add_argument("--greedy", type=int, default=64, help="quality: greedy tokens compared")
    p.add_argument("--out", type=Path, help="JSON output (default: benchmarks/quant_<what>_<platform>.json)")
    args = p.parse_args()

    result = speed(args) if args.what == "speed" else quality(args)
    name = f"quant_{args.what}{'_smoke' if args.smoke else ''}_{jax.default_backend()}.json"
    out = args.out or ROOT / "benchmarks" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
        "machine": platform.machine(), "jax": jax.__version__, **result,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
