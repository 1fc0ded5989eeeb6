#!/usr/bin/env python
"""Benchmark the HTTP server under concurrent streaming chat requests.

Starts `scripts/serve.py` (or uses --url), then for each concurrency level sends streamed chat
completions of a fixed length (ignore_eos) from that many concurrent clients and reports:
  output tok/s   generated tokens / wall time of the level
  TTFT           request sent -> first content chunk
  ITL            per request, (last chunk - first chunk) / (tokens - 1): the mean time per
                 token a client sees (tokens of one decode dispatch arrive in one chunk)
  stall          per request, the longest wait between two content chunks (p99 and max)
With --long-prompt N, one more client sends prompts of about N tokens (max_tokens 1) over and over
while a level runs; it is not counted, but its prefill is what the stall column shows.
p50/p99 over requests; the speed-up column compares each level with concurrency 1 of the same run.
Prints a table and writes JSON (default benchmarks/serve_<date>.json).

    python scripts/bench_serve.py                                   # the demo model, --max-slots 16
    python scripts/bench_serve.py --ckpt ckpt/llama3.1-8b-instruct --concurrency 1,8,32,64
    python scripts/bench_serve.py --url http://127.0.0.1:8000       # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a robot who learns to paint. Describe the colours it sees."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="benchmark a running server instead of starting one")
    p.add_argument("--ckpt", help="checkpoint for the server started here (default: the demo model)")
    p.add_argument("--max-slots", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for serve.py (repeatable)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per level (default: 2 x concurrency, at least 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--long-prompt", type=int, default=0, metavar="N",
                   help="a background client sending ~N-token prompts during each level")
    p.add_argument("--out", type=Path, help="JSON output (default benchmarks/serve_<date>.json)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for the server")
    args = p.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error("--concurrency takes comma-separated integers, e.g. 1,4,16")
    if not args.levels or min(args.levels) < 1 or args.max_tokens < 2:
        p.error("concurrency levels must be >= 1 and --max-tokens >= 2")
    return args


@dataclasses.dataclass
class Sample:
    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    stall: float = 0.0  # longest gap between two content chunks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, str(REPO / "scripts" / "serve.py"), "--port", str(port), "--max-slots", str(args.max_slots),
           "--max-seq-len", str(args.max_seq_len), "--log-level", "warning", *args.serve_arg]
    if args.ckpt:
        cmd += ["--ckpt", args.ckpt]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    sys.exit(f"the server did not answer /health within {args.startup_timeout:.0f}s")


async def one_request(client: httpx.AsyncClient, url: str, model: str, args: argparse.Namespace,
                      prompt: str | None = None, max_tokens: int | None = None) -> Sample:
    body = {"model": model, "messages": [{"role": "user", "content": prompt or args.prompt}],
            "max_tokens": max_tokens or args.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    s = Sample(sent=time.perf_counter())
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                s.tokens = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk["choices"]):
                now = time.perf_counter()
                if s.last is not None:
                    s.stall = max(s.stall, now - s.last)
                s.first = s.first or now
                s.last = now
    return s


async def run_level(url: str, model: str, concurrency: int, n: int, args: argparse.Namespace) -> dict[str, Any]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def client_loop() -> None:
            while not queue.empty():
                queue.get_nowait()
                samples.append(await one_request(client, url, model, args))

        long_done = 0

        async def long_loop() -> None:  # runs until the measured clients are done
            nonlocal long_done
            while True:
                await one_request(client, url, model, args, prompt="word " * args.long_prompt, max_tokens=2)
                long_done += 1

        background = asyncio.create_task(long_loop()) if args.long_prompt else None
        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        if background is not None:
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
    tokens = sum(s.tokens for s in samples)
    ttft = [s.first - s.sent for s in samples if s.first is not None]
    itl = [(s.last - s.first) / (s.tokens - 1) for s in samples if s.first is not None and s.tokens > 1]
    return {"concurrency": concurrency, "requests": n, "output_tokens": tokens, "wall_s": wall,
            "output_tok_s": tokens / wall, "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99),
            "stall_p99_s": _pct([s.stall for s in samples], 99), "stall_max_s": max(s.stall for s in samples),
            "long_prompts": long_done}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def print_table(rows: list[dict[str, Any]]) -> None:
    base = rows[0]["output_tok_s"] if rows and rows[0]["concurrency"] == 1 else None
    head = f"{'conc':>5} {'reqs':>5} {'out tok/s':>10} {'speed-up':>9} {'TTFT p50':>9} {'TTFT p99':>9} " \
           f"{'ITL p50':>9} {'ITL p99':>9} {'stall p99':>9} {'stall max':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        up = f"{r['output_tok_s'] / base:.2f}x" if base else "-"
        print(f"{r['concurrency']:>5} {r['requests']:>5} {r['output_tok_s']:>10.1f} {up:>9} "
              f"{r['ttft_p50_s'] * 1e3:>7.0f}ms {r['ttft_p99_s'] * 1e3:>7.0f}ms "
              f"{r['itl_p50_s'] * 1e3:>7.1f}ms {r['itl_p99_s'] * 1e3:>7.1f}ms "
              f"{r['stall_p99_s'] * 1e3:>7.0f}ms {r['stall_max_s'] * 1e3:>7.0f}ms")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    proc = None
    url = args.url.rstrip("/") if args.url else None
    if url is None:
        proc, url = start_server(args)
    try:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        # Warm-up: compiles the prefill bucket and decode window these requests use; with long
        # prompts, the chunk and window shapes they meet too (a whole level, untimed).
        asyncio.run(run_level(url, model, 1, 1, args))
        if args.long_prompt:
            asyncio.run(run_level(url, model, args.levels[0], args.requests or max(4, 2 * args.levels[0]), args))
        rows = []
        for c in args.levels:
            n = args.requests or max(4, 2 * c)
            rows.append(asyncio.run(run_level(url, model, c, n, args)))
            print(f"concurrency {c}: {rows[-1]['output_tok_s']:.1f} output tok/s", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    print_table(rows)
    date = datetime.date.today().isoformat()
    out = args.out or REPO / "benchmarks" / f"serve_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": date, "model": model, "url": args.url, "ckpt": args.ckpt,
        "max_slots": None if args.url else args.max_slots,
        "max_tokens": args.max_tokens, "prompt": args.prompt, "long_prompt_words": args.long_prompt,
        "host": platform.node(), "cpus": os.cpu_count(),
        "levels": rows,
    }
    if rows[0]["concurrency"] == 1:
        result["speedup_vs_concurrency_1"] = {str(r["concurrency"]): r["output_tok_s"] / rows[0]["output_tok_s"]
                                             for r in rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
