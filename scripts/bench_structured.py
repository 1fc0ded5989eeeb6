#!/usr/bin/env python
"""What structured output costs: decode speed with a JSON-schema constraint against the same
engine unconstrained, in one run, on the demo model (or --ckpt).

    python scripts/bench_structured.py                   # batch 1 and 4, 64 new tokens
    python scripts/bench_structured.py --batch 1 8 --new-tokens 128

Three settings generate --new-tokens tokens for each of `batch` prompts:
  plain      the engine as configured (--decode-steps tokens per dispatch);
  one-step   unconstrained, one token per dispatch (what a batch does while any request in it is
             constrained): the dispatch cost alone;
  json       every request constrained to a JSON list of strings long enough never to finish.
Decode rate: tokens after the first over the time after the first, summed over the batch; best
of --repeats. Also the llguidance time per token (mask + advance), replayed on the tokens the
json run produced. Prints a table and writes JSON under benchmarks/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench import PROMPTS, write_result  # noqa: E402

# Strings in a list that must hold more items than any run writes: the output never completes.
SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1000}


def decode_rate(completions: list) -> float:
    """Tokens per second after each sequence's first, summed over the batch."""
    return sum((c.completion_tokens - 1) / (c.duration - c.time_to_first_token) for c in completions)


def best_rate(llm, prompts: list[list[int]], sampling, repeats: int, **generate: object) -> tuple[float, list]:
    """The best decode rate of `repeats` runs of llm.generate(prompts, sampling, **generate)."""
    llm.generate(prompts, sampling, **generate)  # warm-up: compiles
    best, last = 0.0, []
    for _ in range(repeats):
        last = llm.generate(prompts, sampling, **generate)
        assert all(c.completion_tokens == sampling.max_tokens for c in last), [c.finish_reason for c in last]
        best = max(best, decode_rate(last))
    return best, last


def grammar_seconds_per_token(llm, constraint, completions: list) -> float:
    """llguidance's time per token (mask, then advance), replaying the generated tokens."""
    total, count = 0.0, 0
    for c in completions:
        m = llm.scheduler.grammars.matcher(constraint)
        t = time.perf_counter()
        for token in c.token_ids:
            m.mask()
            m.advance(token)
        total += time.perf_counter() - t
        count += len(c.token_ids)
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: the demo model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "structured_cpu.json")
    args = ap.parse_args()

    import llama_jax
    from llama_jax import SamplingParams, StructuredOutput
    from llama_jax.api import LLM

    slots = max(args.batch)
    llm = llama_jax.load(args.ckpt, dtype=args.dtype, max_slots=slots, max_seq_len=512,
                         decode_steps=args.decode_steps, progress=False)
    one_step = LLM(llm.config, llm.params, llm.tokenizer, max_slots=slots, max_seq_len=512, decode_steps=1)
    constraint = StructuredOutput(json=SCHEMA)
    n = args.new_tokens
    plain = SamplingParams.greedy(max_tokens=n, ignore_eos=True)
    constrained = plain.replace(structured_output=constraint)

    rows = []
    print(f"{'batch':>5} {'plain tok/s':>12} {'one-step':>9} {'json':>9} {'json/plain':>10} {'llguidance ms/tok':>18}")
    for b in args.batch:
        prompts = [llm.chat_format.encode_dialog([{"role": "user", "content": f"{p} Answer as a JSON list."}])
                   for p in (PROMPTS * b)[:b]]
        plain_rate, _ = best_rate(llm, prompts, plain, args.repeats)
        one_rate, _ = best_rate(one_step, prompts, plain, args.repeats)
        json_rate, outs = best_rate(llm, prompts, constrained, args.repeats)
        assert all(c.text.lstrip().startswith("[") for c in outs), [c.text[:20] for c in outs]
        grammar_ms = 1000 * grammar_seconds_per_token(llm, constraint, outs)
        rows.append({"batch": b, "plain_tok_s": plain_rate, "one_step_tok_s": one_rate, "json_tok_s": json_rate,
                     "json_over_plain": json_rate / plain_rate, "llguidance_ms_per_token": grammar_ms})
        print(f"{b:>5} {plain_rate:>12.1f} {one_rate:>9.1f} {json_rate:>9.1f} {json_rate / plain_rate:>10.2f} "
              f"{grammar_ms:>18.3f}")

    write_result(args.out, args.ckpt, args.dtype, new_tokens=n, decode_steps=args.decode_steps, schema=SCHEMA,
                 rows=rows)


if __name__ == "__main__":
    main()
