#!/usr/bin/env python
"""Decode speed with speculative decoding by prompt lookup (n-gram drafts) on and off, in one run.

    python scripts/bench_spec.py                       # the demo model, 4 draft tokens
    python scripts/bench_spec.py --speculative-config '{"num_speculative_tokens": 6}' --max-tokens 256

Three chat tasks, answered greedily: editing code (the answer repeats the prompt), proofreading a
paragraph (likewise), and an open question (little to look up). Each runs alone (batch 1), then
all three together (batch 3). Both settings must give the same tokens (speculation does not change
outputs); the table gives generated tokens per second, the best of --repeats after a pass that
compiles, their ratio, and the share of draft tokens the model kept. Writes JSON under benchmarks/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench import write_result  # noqa: E402

CODE = '''def load_rows(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            rows.append(line.split(","))
    return rows


def column_means(rows):
    sums = [0.0] * len(rows[0])
    for row in rows:
        for i, value in enumerate(row):
            sums[i] += float(value)
    return [s / len(rows) for s in sums]
'''
PARAGRAPH = (
    "The lighthouse stood at the end of the pier for more then a hundred years. Every evening the keeper "
    "climbed the two hundred steps, cleaned the lens and lit the lamp, wether the sea was calm or wild. "
    "Ships that passed the cape in the night steered by it's light, and the fishermen of the village said "
    "that as long as the lamp burned, no boat would be lost on the rocks below."
)
TASKS = {
    "code edit": f"Rename the function load_rows to read_rows in this code and output the whole code:\n\n{CODE}",
    "proofread": f"Fix the spelling mistakes in this paragraph and output the corrected paragraph:\n\n{PARAGRAPH}",
    "open question": "Explain in a few paragraphs why the sky is blue and why sunsets are red.",
}


def run(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    from llama_jax import SamplingParams

    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams.greedy(max_tokens=max_tokens))
    return time.perf_counter() - start, [o.token_ids for o in outs]


def measure(llm, prompts: list[list[int]], max_tokens: int, repeats: int, speculation) -> dict:
    engine = llm.engine
    engine.speculation = speculation  # the engine reads it at every step
    run(llm, prompts, max_tokens)  # compiles
    best, drafted, accepted = float("inf"), engine.drafted, engine.accepted
    for _ in range(repeats):
        seconds, tokens = run(llm, prompts, max_tokens)
        best = min(best, seconds)
    n = sum(len(t) for t in tokens)
    per_pass = lambda total: (total / repeats) if speculation else 0  # noqa: E731
    return {"tokens": tokens, "generated": n, "tok_per_s": n / best,
            "drafted": per_pass(engine.drafted - drafted), "accepted": per_pass(engine.accepted - accepted)}


def main() -> None:
    from llama_jax.speculative import NgramSpeculation, add_arguments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: the demo model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2)
    add_arguments(ap)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "speculative_cpu.json")
    args = ap.parse_args()
    spec = args.speculative_config or NgramSpeculation(num_tokens=4)

    import llama_jax

    llm = llama_jax.load(args.ckpt, dtype=args.dtype, max_slots=4, max_seq_len=2048, progress=False, speculation=spec)
    prompts = {name: llm.chat_format.encode_dialog([{"role": "user", "content": text}]) for name, text in TASKS.items()}
    cases = [(name, [ids]) for name, ids in prompts.items()] + [("all three together", list(prompts.values()))]
    print(f"{spec}\n{'task':<20} {'batch':>5} {'tokens':>6} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>8} "
          f"{'kept':>9}")
    rows = []
    for name, batch in cases:
        plain = measure(llm, batch, args.max_tokens, args.repeats, None)
        fast = measure(llm, batch, args.max_tokens, args.repeats, spec)
        assert fast["tokens"] == plain["tokens"], f"{name}: speculation changed the greedy tokens"
        kept = fast["accepted"] / fast["drafted"] if fast["drafted"] else 0.0
        rows.append({"task": name, "batch": len(batch), "generated": plain["generated"],
                     "plain_tok_per_s": plain["tok_per_s"], "spec_tok_per_s": fast["tok_per_s"],
                     "speedup": fast["tok_per_s"] / plain["tok_per_s"], "draft_tokens": fast["drafted"],
                     "accepted_tokens": fast["accepted"], "acceptance": kept})
        r = rows[-1]
        kept_of = f"{r['accepted_tokens']:.0f}/{r['draft_tokens']:.0f}"
        print(f"{name:<20} {len(batch):>5} {r['generated']:>6} {r['plain_tok_per_s']:>11.1f} "
              f"{r['spec_tok_per_s']:>10.1f} {r['speedup']:>7.2f}x {kept_of:>9}")
    write_result(args.out, args.ckpt, args.dtype, max_tokens=args.max_tokens,
                 speculation={"method": "ngram", "num_speculative_tokens": spec.num_tokens,
                              "prompt_lookup_max": spec.prompt_lookup_max, "prompt_lookup_min": spec.prompt_lookup_min},
                 results=rows)


if __name__ == "__main__":
    main()
