#!/usr/bin/env python
"""Decode speed and time to first token: llama-jax against transformers' `generate`, in one run.

    python scripts/bench.py                      # the demo model, float32, batch 1 and 8
    python scripts/bench.py --batch 1 8 16 --new-tokens 64

Both engines get the same prompts (chat-formatted), generate exactly --new-tokens tokens greedily
(EOS ignored) and are timed after a warm-up run. The batch-1 rate is also reported against this
machine's memory-bandwidth ceiling: weight bytes read per token × tokens/s, over the bandwidth of
a large-array read measured in the same run. Every batch is also reported against a decode step
reduced to its weight products (the same matrix products in the engine's form, nothing else): on
CPU at batch 8 those products, more than memory, set the pace. Prints a table and writes JSON
under benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "Why is the sky blue?",
    "Give me a name for a friendly robot.",
    "What does a compiler do?",
    "Translate 'good morning' into Spanish.",
]


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo on Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_result(path: Path, ckpt: str | None, dtype: str, **fields) -> None:
    """The JSON of a run on the demo model (or `ckpt`): date, machine, jax, model, dtype, `fields`."""
    import jax

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {jax.device_count()} {jax.default_backend()} device(s), {platform.python_version()}",
        "jax": jax.__version__, "model": str(ckpt or "demo: SmolLM2-135M-Instruct"), "dtype": dtype, **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def best_seconds(run, repeats: int) -> float:
    """The shortest of `repeats` timed calls of `run` (which must wait for its own result)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of summing a large float32 array (a memory-bound read), the best of numpy (one
    thread) and a jitted XLA reduction (all cores) over several runs."""
    import jax
    import jax.numpy as jnp

    a = np.ones(int(gib * (1 << 30)) // 4, np.float32)
    device_a = jnp.asarray(a)
    total = jax.jit(jnp.sum)
    total(device_a).block_until_ready()
    numpy_s = best_seconds(a.sum, repeats)
    return a.nbytes / min(numpy_s, best_seconds(lambda: total(device_a).block_until_ready(), repeats))


def weight_products_rate(params, config, batch: int, feature_major: bool, steps: int = 16,
                         repeats: int = 5) -> float | None:
    """Tokens/s of a decode step reduced to its weight products: the model's own 2-D products
    (the same weights, the LM head included) chained through a residual, with no KV cache,
    attention, rotary, norm or sampler; `steps` of them per dispatch, like the engine. With
    `feature_major`, in the engine's CPU form (model.decode_feature_major: (out, in) weights times
    the activations as columns), else as `model.dense` (rows times (in, out) weights). What XLA's
    matrix products alone allow at this batch: a ceiling for the whole step. Every logit feeds
    the next step, so XLA cannot drop part of the LM head. None for stacked (scanned) layers."""
    import jax
    import jax.numpy as jnp

    from llama_jax.model import dense, feature_major_params

    if not isinstance(params["layers"], (list, tuple)):
        return None
    group = config.n_heads // config.n_kv_heads

    def step_rows(x, _):  # x (B, D)
        for p in params["layers"]:
            q = dense("bd,dnh->bnh", x, p["wq"])
            kv = dense("bd,dkh->bkh", x, p["wk"]) + dense("bd,dkh->bkh", x, p["wv"])
            x = x + dense("bnh,nhd->bd", q + jnp.repeat(kv, group, axis=1), p["wo"])
            up = jax.nn.silu(dense("bd,df->bf", x, p["w_gate"])) * dense("bd,df->bf", x, p["w_up"])
            x = x + dense("bf,fd->bd", up, p["w_down"])
        if config.tie_embeddings:
            logits = jnp.einsum("bd,vd->bv", x, params["embed"], preferred_element_type=jnp.float32)
        else:
            logits = dense("bd,dv->bv", x, params["lm_head"], out_dtype=jnp.float32)
        return x + logits.max(axis=1, keepdims=True).astype(x.dtype), None

    columns = feature_major_params(params) if feature_major else None

    def step_columns(h, _):  # h (D, B)
        for p in columns["layers"]:
            q = p["wq"] @ h
            kv = (p["wk"] @ h + p["wv"] @ h).reshape(config.n_kv_heads, config.head_dim, -1)
            h = h + p["wo"] @ (q + jnp.repeat(kv, group, axis=0).reshape(q.shape))
            h = h + p["w_down"] @ (jax.nn.silu(p["w_gate"] @ h) * (p["w_up"] @ h))
        head = columns["embed"] if config.tie_embeddings else columns["lm_head"]  # (V, D)
        logits = jnp.dot(head, h, preferred_element_type=jnp.float32)
        return h + logits.max(axis=0, keepdims=True).astype(h.dtype), None

    step = step_columns if feature_major else step_rows
    run = jax.jit(lambda x: jax.lax.scan(step, x, None, length=steps)[0])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, config.dim)), params["embed"].dtype)
    x = x.T if feature_major else x
    run(x).block_until_ready()
    return batch * steps / best_seconds(lambda: run(x).block_until_ready(), repeats)


def bench_ours(llm, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    from llama_jax import SamplingParams

    sp = SamplingParams.greedy(max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, sp)  # compile
    runs = []
    for _ in range(repeats):
        out = llm.generate(prompts, sp)
        assert all(o.completion_tokens == new_tokens for o in out)
        ttft = max(o.time_to_first_token for o in out)
        total = max(o.duration for o in out)
        runs.append((ttft, len(prompts) * (new_tokens - 1) / (total - ttft)))
    return {"ttft_s": statistics.median(r[0] for r in runs), "decode_tok_s": statistics.median(r[1] for r in runs)}


def bench_transformers(model, tokenizer, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad)
        assert out.shape[1] == width + n
        return time.perf_counter() - t

    run(2)  # warm-up
    runs = []
    for _ in range(repeats):
        ttft = run(1)
        total = run(new_tokens)
        runs.append((ttft, len(prompts) * (new_tokens - 1) / (total - ttft)))
    return {"ttft_s": statistics.median(r[0] for r in runs), "decode_tok_s": statistics.median(r[1] for r in runs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="llama-jax checkpoint or source (default: the demo model)")
    p.add_argument("--gguf", help="GGUF file for transformers (default: the demo model's)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "generate_cpu.json")
    args = p.parse_args()

    import jax
    import torch
    import transformers

    import llama_jax
    from llama_jax.sources import demo_gguf

    torch.set_num_threads(args.threads)
    def load(batch: int):  # an engine with as many slots as the batch: decode computes every slot
        return llama_jax.load(args.ckpt, dtype="float32", max_slots=batch, max_seq_len=512, progress=False)

    llm = load(args.batch[0])
    gguf = Path(args.gguf) if args.gguf else demo_gguf()
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                 dtype=torch.float32).eval()
    prompts_all = [llm.chat_format.encode_dialog([{"role": "user", "content": t}]) for t in PROMPTS]

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(llm.params))
    bandwidth = read_bandwidth()
    rows = []
    for b in args.batch:
        prompts = [prompts_all[i % len(prompts_all)] for i in range(b)]
        ours = bench_ours(llm if llm.engine.max_slots == b else load(b), prompts, args.new_tokens, args.repeats)
        theirs = bench_transformers(hf_model, hf_tok, prompts, args.new_tokens, args.repeats)
        row = {"batch": b, "llama_jax": ours, "transformers": theirs,
               "decode_speedup": ours["decode_tok_s"] / theirs["decode_tok_s"]}
        products = weight_products_rate(llm.params, llm.config, b, llm.engine.feature_major_decode)
        if products:
            row["weight_products_tok_s"] = products
            row["products_fraction"] = ours["decode_tok_s"] / products
        if b == 1:
            row["bandwidth_fraction"] = weight_bytes * ours["decode_tok_s"] / bandwidth
        rows.append(row)

    print(f"\nmodel {llm.path.name}, float32, {weight_bytes / 1e6:.0f} MB of weights; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {args.new_tokens} new tokens")
    print(f"{'batch':>5} | {'ours tok/s':>10} | {'HF tok/s':>9} | {'ratio':>5} | {'ours TTFT':>9} | {'HF TTFT':>8} | "
          f"{'products tok/s':>14} | {'of it':>5}")
    for r in rows:
        o, t = r["llama_jax"], r["transformers"]
        products = (f"{r['weight_products_tok_s']:>14.1f} | {r['products_fraction']:>5.0%}" if "products_fraction" in r
                    else f"{'-':>14} | {'-':>5}")
        print(f"{r['batch']:>5} | {o['decode_tok_s']:>10.1f} | {t['decode_tok_s']:>9.1f} | {r['decode_speedup']:>5.2f} | "
              f"{o['ttft_s'] * 1000:>7.0f}ms | {t['ttft_s'] * 1000:>6.0f}ms | {products}")
    print("(products: a decode step reduced to its weight products, the ceiling XLA's matrix products set)")
    for r in rows:
        if "bandwidth_fraction" in r:
            print(f"batch 1 reads weights at {r['bandwidth_fraction']:.0%} of the measured read bandwidth")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "model": llm.path.name, "dtype": "float32",
        "new_tokens": args.new_tokens, "weight_bytes": weight_bytes, "read_bandwidth_bytes_s": bandwidth,
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
