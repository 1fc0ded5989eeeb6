#!/usr/bin/env python
"""Run a file of OpenAI batch requests offline, as vLLM's run-batch does.

    python scripts/run_batch.py -i requests.jsonl -o results.jsonl --ckpt ckpt/llama3.1-8b-instruct

Each input line: {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
"body": {"model": ..., "messages": [...], "max_tokens": 64}} (any POST route of scripts/serve.py:
/v1/chat/completions, /v1/completions, /v1/responses, /v1/messages, /tokenize). Each output
line, in the input's order: {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}. A request's `model` is the served name (--model-name; default: the checkpoint's
directory name). All requests are queued at once, so the engine batches them continuously.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from llama_jax.quantization import add_arguments
    from llama_jax.speculative import add_arguments as add_speculative_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input-file", required=True, type=Path, help="requests, one JSON object per line")
    p.add_argument("-o", "--output-file", required=True, type=Path, help="where the answers go (JSON lines)")
    p.add_argument("--ckpt", "--model",
                   help="checkpoint: llama-jax, HF dir, Meta dir or .gguf (default: the demo model)")
    p.add_argument("--model-name", "--served-model-name", help="the model name the requests give")
    p.add_argument("--mesh", help='device mesh, e.g. "tp=8" or "dp=2,tp=4"')
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--max-slots", "--max-num-seqs", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-seq-len", "--max-model-len", type=int, default=4096, help="context per sequence")
    p.add_argument("--attention", choices=["xla", "pallas"], default="xla")
    p.add_argument("--chat-template", help="a Jinja chat template (file or text) in place of the model's own")
    add_arguments(p)
    add_speculative_arguments(p)
    args = p.parse_args(argv)
    if args.max_slots < 1 or args.max_seq_len < 1:
        p.error("--max-slots and --max-seq-len must be >= 1")
    if not args.input_file.is_file():
        p.error(f"--input-file {args.input_file}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import llama_jax
    from llama_jax.quantization import load_arguments
    from llama_jax.server import create_app
    from llama_jax.server.batch import run_batch

    lines = args.input_file.read_text(encoding="utf-8").splitlines()
    try:
        llm = llama_jax.load(args.ckpt, dtype=args.dtype, max_slots=args.max_slots, max_seq_len=args.max_seq_len,
                             attention_impl=args.attention, mesh=args.mesh, speculation=args.speculative_config,
                             chat_template=args.chat_template, **load_arguments(args))
        app = create_app(llm, model_name=args.model_name, max_queue=max(len(lines), 1))
    except (ValueError, OSError) as e:
        print(f"run_batch.py: error: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            print(f"\r{done}/{total} requests", end="\n" if done == total else "", file=sys.stderr, flush=True)

    results = asyncio.run(run_batch(app, lines, progress=progress))
    with args.output_file.open("w", encoding="utf-8") as f:
        for entry in results:
            f.write(json.dumps(entry) + "\n")
    ok = sum(1 for r in results if r["response"] and r["response"]["status_code"] == 200)
    print(f"{ok} of {len(results)} requests answered 200 in {time.perf_counter() - start:.1f}s; "
          f"wrote {args.output_file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
