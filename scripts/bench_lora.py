#!/usr/bin/env python
"""What serving several LoRA adapters at once costs: decode speed of a batch whose rows run
different adapters, against the base model, in one run, on the demo model (or --ckpt).

    python scripts/bench_lora.py                        # 4 adapters of rank 16, batch 1 and 8
    python scripts/bench_lora.py --adapters 8 --rank 32 --batch 8 16

Random adapters (all seven projections, B not zero) are written to a temporary directory.
Four settings generate --new-tokens greedy tokens for each of `batch` prompts:
  base          the base model as `load` gives it (on one CPU: the feature-major decode);
  base-stored   the base model with the weights' stored layout, the layout adapters need;
  merged        one adapter merged into the weights (what `--adapters` gives): the base's cost;
  multi         all adapters held at once (`--lora-modules`), row i running adapter i mod N + 1.
Decode rate: tokens after the first over the time after the first, summed over the batch; best
of --repeats. Prints a table and writes JSON under benchmarks/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench import PROMPTS, write_result  # noqa: E402
from scripts.bench_structured import best_rate  # noqa: E402


def write_adapters(config, n: int, rank: int, directory: Path) -> list[Path]:
    import jax
    import numpy as np

    from llama_jax import lora

    cfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank)
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        adapters = jax.tree.map(lambda x: np.asarray(x) + 0.01 * rng.standard_normal(x.shape).astype(np.float32),
                                lora.init(config, cfg, jax.random.key(i)))
        out.append(lora.save(directory / f"adapter{i}", adapters, cfg, config))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: the demo model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "lora_cpu.json")
    args = ap.parse_args()
    if args.adapters < 1 or args.rank < 1:
        ap.error("--adapters and --rank must be >= 1")

    import llama_jax
    from llama_jax import SamplingParams

    kw = dict(dtype=args.dtype, max_slots=max(args.batch), max_seq_len=512, progress=False)
    base = llama_jax.load(args.ckpt, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_adapters(base.config, args.adapters, args.rank, Path(tmp))
        settings = {
            "base": (base, 0),
            "base-stored": (llama_jax.load(args.ckpt, feature_major_decode=False, **kw), 0),
            "merged": (llama_jax.load(args.ckpt, adapters=dirs[0], **kw), 0),
            "multi": (llama_jax.load(args.ckpt, lora_modules={f"a{i}": d for i, d in enumerate(dirs)}, **kw), None),
        }
    sampling = SamplingParams.greedy(max_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    print(f"{'batch':>5} " + " ".join(f"{k + ' tok/s':>17}" for k in settings) + f" {'multi/base-stored':>18}")
    for b in args.batch:
        prompts = [base.chat_format.encode_dialog([{"role": "user", "content": p}]) for p in (PROMPTS * b)[:b]]
        rates = {}
        for name, (llm, adapter) in settings.items():
            chosen = adapter if adapter is not None else [i % args.adapters + 1 for i in range(b)]
            rates[name], _ = best_rate(llm, prompts, sampling, args.repeats, adapter=chosen)
        rows.append({"batch": b, **{f"{k}_tok_s": v for k, v in rates.items()},
                     "multi_over_base_stored": rates["multi"] / rates["base-stored"],
                     "multi_over_base": rates["multi"] / rates["base"]})
        print(f"{b:>5} " + " ".join(f"{v:>17.1f}" for v in rates.values())
              + f" {rates['multi'] / rates['base-stored']:>18.2f}")
    write_result(args.out, args.ckpt, args.dtype, new_tokens=args.new_tokens, adapters=args.adapters,
                 rank=args.rank, rows=rows)


if __name__ == "__main__":
    main()
