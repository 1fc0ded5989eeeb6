#!/usr/bin/env python
"""Serve a checkpoint over an OpenAI-compatible HTTP API (chat, completions, streaming, tools).

    python scripts/serve.py                                   # the demo model on 127.0.0.1:8000
    python scripts/serve.py --ckpt ckpt/llama3.1-8b-instruct --mesh tp=8 --max-slots 32
    python scripts/serve.py --lora-modules pirate=adapters/pirate legal=adapters/legal

vLLM's names for the same settings are accepted too (--model, --served-model-name, -tp/-dp,
--max-num-seqs, --max-model-len, --no-enable-prefix-caching, --gpu-memory-utilization), as are
--enable-auto-tool-choice and --tool-call-parser llama3_json (tool calls are always parsed).

Then, with the official client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model=client.models.list().data[0].id,
                                   messages=[{"role": "user", "content": "Hi"}])

--ckpt takes a llama-jax checkpoint, an HF directory, a Meta directory or a GGUF file (converted
on first use and cached); without it, SmolLM2-135M-Instruct. Endpoints: /v1/chat/completions,
/v1/completions, /v1/responses, /v1/messages (Anthropic's), /tokenize, /detokenize, /v1/models, /health,
/metrics (Prometheus).

LoRA adapters can also come and go while serving, as with vLLM (a trainer pushing new weights):

    python scripts/serve.py --max-loras 4 --allow-runtime-lora-updating
    curl localhost:8000/v1/load_lora_adapter -H 'Content-Type: application/json' \\
        -d '{"lora_name": "pirate", "lora_path": "adapters/pirate"}'
    curl localhost:8000/v1/unload_lora_adapter -H 'Content-Type: application/json' -d '{"lora_name": "pirate"}'

Several hosts (e.g. 405B in bf16 on two 8-GPU nodes): run it on every host with the same
--coordinator and --num-processes and its own --process-id, on a converted checkpoint on a
shared filesystem. Process 0 serves HTTP; the others repeat its device calls (llama_jax/lockstep.py).

    python scripts/serve.py --ckpt /shared/405b --coordinator node0:1234 --num-processes 2 --process-id 0
    python scripts/serve.py --ckpt /shared/405b --coordinator node0:1234 --num-processes 2 --process-id 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

API_KEY_ENV = "LLAMA_JAX_API_KEY"  # read when --api-key is not given (a key on the command line shows in `ps`)
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def json_object(text: str) -> dict:
    """An argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", "--model",
                   help="checkpoint: llama-jax, HF dir, Meta dir or .gguf (default: the demo model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", "--served-model-name",
                   help="the model id clients send (default: the checkpoint's directory name)")
    p.add_argument("--mesh", help='device mesh, e.g. "tp=8" or "dp=2,tp=4"')
    p.add_argument("-tp", "--tensor-parallel-size", type=int, help="vLLM's spelling of --mesh tp=N")
    p.add_argument("-dp", "--data-parallel-size", type=int, help="vLLM's spelling of --mesh dp=N (with -tp)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"],
                   help="default (auto): bfloat16 on GPU, float32 on CPU")
    p.add_argument("--max-slots", "--max-num-seqs", type=int, default=16,
                   help="sequences decoded together (default 16)")
    p.add_argument("--max-seq-len", "--max-model-len", type=int, default=4096,
                   help="context per sequence, prompt + output")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="fraction of each GPU's memory JAX reserves (XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's default "
                        "is 0.75)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 503s")
    p.add_argument("--decode-steps", type=int, default=8, help="tokens per sequence per decode dispatch")
    p.add_argument("--prefill-budget", type=int,
                   help="prompt tokens prefilled between two decode dispatches (default: 4 x the largest bucket)")
    p.add_argument("--attention", choices=["xla", "pallas"], default="xla")
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                   help="admit queued requests in arrival order, or by their `priority` field (lower first; "
                        "one that finds no free slot preempts a running request of a higher value)")
    p.add_argument("--no-prefix-reuse", "--no-enable-prefix-caching", action="store_true",
                   help="prefill every prompt whole, even when a free slot's cache holds its start")
    p.add_argument("--chat-template", help="a Jinja chat template (file or text) in place of the model's own")
    p.add_argument("--default-chat-template-kwargs", type=json_object, default={}, metavar="JSON",
                   help='chat template variables for every chat, e.g. \'{"date_string": "26 Jul 2024"}\' '
                        "(a request's chat_template_kwargs win)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted as vLLM takes it; tool calls are always parsed when a request gives tools")
    p.add_argument("--tool-call-parser", choices=["llama3_json"],
                   help="accepted as vLLM takes it; the Llama 3.1 parser (JSON calls, <|python_tag|> built-in "
                        "calls) is the one there is")
    p.add_argument("--api-key", nargs="+", metavar="KEY", default=[],
                   help="require 'Authorization: Bearer KEY' (any of these) on every route but /health and "
                        f"/metrics; default: the {API_KEY_ENV} environment variable, else no key")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body (413 beyond)")
    p.add_argument("--stall-timeout", type=float, default=600.0,
                   help="/health answers 503 while one engine step has run longer than this (seconds; 0: never)")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling the common shapes before serving")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--adapters", help="LoRA adapter directory (scripts/finetune.py --out)")
    p.add_argument("--no-merge-adapters", dest="merge_adapters", action="store_false",
                   help="apply the adapters on the fly instead of merging them into the weights")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=DIR", default=[],
                   help="LoRA adapters served at once beside the base model, each as a model of its own "
                        "(requests pick one by its name in `model`)")
    p.add_argument("--enable-lora", action="store_true",
                   help="hold LoRA adapter slots (--max-loras) that take adapters at run time")
    p.add_argument("--max-loras", type=int,
                   help="LoRA adapter slots, for --lora-modules and adapters loaded at run time (default with "
                        "--enable-lora: 1, or the number of --lora-modules); each holds every target's A and B")
    p.add_argument("--max-cpu-loras", type=int,
                   help="LoRA adapters served in all (default: --max-loras, or the --lora-modules if more); "
                        "those beyond the slots wait in host memory and take the least recently used idle slot "
                        "when a request names them")
    p.add_argument("--max-lora-rank", type=int,
                   help="the largest rank of an adapter loaded at run time (default 16, or the largest "
                        "--lora-modules rank)")
    p.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter, which read adapter directories "
                        f"clients name on this machine (also: {RUNTIME_LORA_ENV}=true, as vLLM reads it)")
    from llama_jax.distributed import add_arguments as add_distributed_arguments
    from llama_jax.quantization import add_arguments
    from llama_jax.speculative import add_arguments as add_speculative_arguments

    add_arguments(p)
    add_speculative_arguments(p)
    group = add_distributed_arguments(p)
    group.add_argument("--lockstep-port", type=int, default=0,
                       help="port process 0 sends the device calls from (default: any free port)")
    args = p.parse_args(argv)
    for name in ("max_slots", "max_seq_len", "max_queue", "decode_steps", "prefill_budget"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.dtype == "auto":
        args.dtype = None
    if args.tensor_parallel_size is not None or args.data_parallel_size is not None:
        if args.mesh:
            p.error("give --mesh or --tensor-parallel-size/--data-parallel-size, not both")
        sizes = {"dp": args.data_parallel_size, "tp": args.tensor_parallel_size}
        if any(n is not None and n < 1 for n in sizes.values()):
            p.error("--tensor-parallel-size and --data-parallel-size must be >= 1")
        args.mesh = ",".join(f"{axis}={n}" for axis, n in sizes.items() if n is not None)
    if args.stall_timeout < 0:
        p.error("--stall-timeout must be >= 0")
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        p.error("--gpu-memory-utilization must be in (0, 1]")
    if not 0 < args.port < 65536:
        p.error("--port must be in 1..65535")
    if not 0 <= args.lockstep_port < 65536:
        p.error("--lockstep-port must be in 0..65535")
    modules: dict[str, str] = {}
    for entry in args.lora_modules:
        name, sep, path = entry.partition("=")
        if not (sep and name and path):
            p.error(f"--lora-modules takes NAME=DIR entries, got {entry!r}")
        if name in modules:
            p.error(f"--lora-modules names {name!r} twice")
        modules[name] = path
    args.lora_modules = modules
    if os.environ.get(RUNTIME_LORA_ENV, "").lower() in ("1", "true"):
        args.allow_runtime_lora_updating = True
    for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_loras is None and (args.enable_lora or args.allow_runtime_lora_updating):
        args.max_loras = max(1, len(modules))
    if args.max_cpu_loras is not None:
        if args.max_loras is None:
            p.error("--max-cpu-loras needs --max-loras (the adapter slots)")
        if args.max_cpu_loras < max(args.max_loras, len(modules)):
            p.error(f"--max-cpu-loras {args.max_cpu_loras} is fewer than --max-loras or the --lora-modules")
    if not args.api_key and os.environ.get(API_KEY_ENV):
        args.api_key = [os.environ[API_KEY_ENV]]
    if any(not key.strip() for key in args.api_key):
        p.error("--api-key: a key is empty")
    return args


def warm_up(llm: object) -> float:
    """Compile the programs short requests use before clients wait on them: prefill in the prompt
    buckets from 17 to 64 tokens (where chat prompts with their headers usually land), for one
    prompt and for every power-of-two number of prompts admitted together (a burst), and decode."""
    from llama_jax.sampling import SamplingParams

    start = time.perf_counter()
    engine = llm.engine  # type: ignore[attr-defined]
    sampling = SamplingParams.greedy(max_tokens=2 * engine.decode_steps)
    bursts = [1] + [min(2**r, engine.max_slots) for r in range(1, (engine.max_slots - 1).bit_length() + 1)]
    short = [b for b in engine.prefill_buckets if 16 < b <= 64] or list(engine.prefill_buckets[:1])
    for n in short:
        prompt = [1] * max(1, min(n, engine.max_seq_len - 2 * engine.decode_steps))
        for rows in bursts:  # padded to 1, 2, 4, ... rows
            llm.generate([prompt] * rows, sampling)  # type: ignore[attr-defined]
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import uvicorn

    import llama_jax.api
    from llama_jax import lockstep
    from llama_jax.distributed import initialize_from_args
    from llama_jax.quantization import load_arguments
    from llama_jax.server import create_app

    # Our loggers at the chosen level; JAX's and Orbax's stay at warnings.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("llama_jax").setLevel(args.log_level.upper())
    if args.gpu_memory_utilization is not None:  # read when the backend starts, which is below
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.gpu_memory_utilization)
    try:
        multi_host = initialize_from_args(args)  # before anything starts the JAX backend
        if multi_host and args.allow_runtime_lora_updating:
            sys.exit("error: adapters cannot be loaded at run time on several processes")
        llm = llama_jax.api.load(
            args.ckpt, dtype=args.dtype, max_slots=args.max_slots, max_seq_len=args.max_seq_len,
            decode_steps=args.decode_steps, attention_impl=args.attention, mesh=args.mesh,
            adapters=args.adapters, merge_adapters=args.merge_adapters, lora_modules=args.lora_modules or None,
            max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
            speculation=args.speculative_config, chat_template=args.chat_template, **load_arguments(args),
        )
    except (ValueError, OSError) as e:  # bad path, config, checkpoint or mesh: say which, no traceback
        sys.exit(f"error: {e}")
    if args.prefill_budget is not None:
        llm.scheduler.prefill_budget = args.prefill_budget
    llm.scheduler.prefix_reuse = not args.no_prefix_reuse
    llm.scheduler.policy = args.scheduling_policy
    leader = None
    if multi_host:
        import jax

        if jax.process_index() != 0:
            print(f"process {jax.process_index()}: following process 0", file=sys.stderr)
            lockstep.follow(llm)
            return
        leader = lockstep.lead(llm, port=args.lockstep_port)
        llm = leader.llm
    try:
        if not args.no_warmup:
            print(f"warm-up (compiling) took {warm_up(llm):.1f}s", file=sys.stderr)
        try:
            app = create_app(llm, model_name=args.model_name, max_queue=args.max_queue,
                             max_body_bytes=int(args.max_body_mb * (1 << 20)), api_keys=args.api_key,
                             stall_timeout=args.stall_timeout or None,
                             default_chat_template_kwargs=args.default_chat_template_kwargs,
                             runtime_lora_updating=args.allow_runtime_lora_updating,
                             health_checks=[leader.problem] if leader is not None else [])
        except ValueError as e:  # e.g. an adapter named like the model
            sys.exit(f"error: {e}")
        served = ", ".join(repr(m) for m in (app.state.ctx.model_name, *app.state.ctx.adapter_names))
        print(f"serving {served} on http://{args.host}:{args.port}/v1", file=sys.stderr)
        if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: no API key: anyone who reaches {args.host}:{args.port} can use the server "
                  f"(--api-key or {API_KEY_ENV})", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if leader is not None:
            leader.close()


if __name__ == "__main__":
    main()
