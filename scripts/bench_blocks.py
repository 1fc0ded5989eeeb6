"""Decode step time with per-row KV blocks against the dense KV window, in one run.

One long sequence beside short ones (the case blocks are for) and equal short ones (where they
must not lose). Demo model by default; `--long`, `--short`, `--slots` set the mix.

    python scripts/bench_blocks.py --slots 16 --long 2500 --short 100
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llama_jax  # noqa: E402
from llama_jax import SamplingParams  # noqa: E402
from llama_jax.engine import PrefillJob  # noqa: E402


def step_ms(engine: llama_jax.engine.Engine, blocks: bool, calls: int) -> float:
    engine._blocks_ok = blocks
    engine.decode()  # compile
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        engine.decode()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times)) / engine.decode_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="llama-jax checkpoint or source (default: the demo model)")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--long", type=int, default=2500, help="prompt tokens of the long sequence (slot 0)")
    p.add_argument("--short", type=int, default=100, help="prompt tokens of every other sequence")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--calls", type=int, default=4, help="timed decode calls per mode")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "decode_blocks_cpu.json")
    args = p.parse_args()
    if not 0 < args.long < args.max_seq_len or not 0 < args.short < args.max_seq_len:
        p.error("--long and --short must be in [1, --max-seq-len)")

    llm = llama_jax.load(args.ckpt, dtype="float32", max_slots=args.slots, max_seq_len=args.max_seq_len,
                         progress=False)
    engine = llm.engine
    if not engine._blocks_ok:
        sys.exit("this engine cannot decode over blocks (Pallas attention, dp mesh, or a cache length "
                 "that is not a multiple of 128)")
    rng = np.random.default_rng(0)
    vocab = llm.config.vocab_size
    sampling = SamplingParams.greedy(max_tokens=args.max_seq_len, ignore_eos=True)
    rows = []
    for long in (args.long, args.short):
        engine.reset()
        lengths = [long] + [args.short] * (args.slots - 1)
        engine.prefill_many([PrefillJob(i, rng.integers(0, vocab, n).tolist(), sampling, 0)
                             for i, n in enumerate(lengths)])
        dense, blocks = step_ms(engine, False, args.calls), step_ms(engine, True, args.calls)
        rows.append({"long": long, "short": args.short, "slots": args.slots, "dense_ms": dense,
                     "blocks_ms": blocks, "speedup": dense / blocks})
        print(f"slot 0 at {long} tokens, {args.slots - 1} at {args.short}: dense window {dense:.1f} ms a step, "
              f"blocks {blocks:.1f} ms ({dense / blocks:.2f}x)", flush=True)
    args.out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": llm.path.name, "dtype": "float32", "decode_steps": engine.decode_steps, "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
