#!/usr/bin/env python
"""Time to first token of a multi-turn chat with prefix reuse on and off, in one run.

    python scripts/bench_prefix.py                 # the demo model, 6 turns
    python scripts/bench_prefix.py --turns 8 --answer-tokens 64

One conversation (a long system prompt, then --turns user messages, each answered greedily with
--answer-tokens tokens) is played twice per repeat: with the scheduler's prefix reuse (each turn
goes back to its slot and prefills only what is new since the last) and without (each turn
prefills the whole conversation). Both see the same prompts, token for token. A full pass of
each compiles every program first; the table gives each turn's best time to first token over
--repeats. Writes JSON under benchmarks/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench import write_result  # noqa: E402

SYSTEM = (
    "You are a patient tutor for a first-year university course in physics. Answer in plain words, "
    "use one short example when it helps, and never use lists or tables. If a question is ambiguous, "
    "say which reading you answer. Keep units explicit and round numbers sensibly. "
) * 4
QUESTIONS = [
    "What is the difference between speed and velocity?",
    "Why does a ball thrown upwards slow down?",
    "How is momentum related to force?",
    "What happens to kinetic energy in an inelastic collision?",
    "Why do astronauts in orbit feel weightless?",
    "What sets the period of a pendulum?",
    "How does friction depend on the contact area?",
    "What is the work done by a constant force along a closed path?",
]


def play(llm, turns: int, answer_tokens: int) -> list[dict]:
    """One conversation; per turn: prompt tokens, tokens found cached, time to first token."""
    from llama_jax import SamplingParams

    greedy = SamplingParams.greedy(max_tokens=answer_tokens, ignore_eos=True)
    messages = [{"role": "system", "content": SYSTEM}]
    rows = []
    for q in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": q})
        reply = llm.chat(messages, sampling=greedy)
        c = reply.completion
        rows.append({"prompt_tokens": c.prompt_tokens, "cached_tokens": c.cached_tokens,
                     "ttft_s": c.time_to_first_token, "tokens": c.token_ids})
        messages.append({"role": "assistant", "content": reply.content})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: the demo model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "prefix_reuse_cpu.json")
    args = ap.parse_args()
    if not 1 <= args.turns <= len(QUESTIONS):
        ap.error(f"--turns must be in 1..{len(QUESTIONS)}")

    import llama_jax

    llm = llama_jax.load(args.ckpt, dtype=args.dtype, max_slots=4, max_seq_len=2048, progress=False)
    best: dict[bool, list[dict]] = {}
    for reuse in (False, True):  # first passes compile
        llm.scheduler.prefix_reuse = reuse
        play(llm, args.turns, args.answer_tokens)
    for _ in range(args.repeats):
        for reuse in (False, True):
            llm.scheduler.prefix_reuse = reuse
            rows = play(llm, args.turns, args.answer_tokens)
            kept = best.setdefault(reuse, rows)
            for k, r in zip(kept, rows):
                k["ttft_s"] = min(k["ttft_s"], r["ttft_s"])
    off, on = best[False], best[True]
    assert [r["tokens"] for r in off] == [r["tokens"] for r in on], "reuse changed the greedy answers"

    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT off ms':>12} {'TTFT on ms':>11} {'speed-up':>9}")
    table = []
    for i, (a, b) in enumerate(zip(off, on), 1):
        table.append({"turn": i, "prompt_tokens": a["prompt_tokens"], "cached_tokens": b["cached_tokens"],
                      "ttft_off_ms": 1000 * a["ttft_s"], "ttft_on_ms": 1000 * b["ttft_s"],
                      "speedup": a["ttft_s"] / b["ttft_s"]})
        t = table[-1]
        print(f"{i:>4} {t['prompt_tokens']:>7} {t['cached_tokens']:>7} {t['ttft_off_ms']:>12.0f} "
              f"{t['ttft_on_ms']:>11.0f} {t['speedup']:>8.2f}x")
    write_result(args.out, args.ckpt, args.dtype, answer_tokens=args.answer_tokens, turns=table)


if __name__ == "__main__":
    main()
