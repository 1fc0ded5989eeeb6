"""The Python API: `llm = llama_jax.load(path)`, then `llm.generate`, `llm.chat` and their
streaming forms. One engine and one scheduler per LLM; the batch calls drive the scheduler
until their requests are done.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, lora, quantization
from .attention import AttentionImpl
from .config import LlamaConfig
from .engine import Engine
from .model import KVCache, Params, forward
from .sampling import SamplingParams
from .scheduler import Event, Request, Scheduler, TokenLogprob, check_token_ids
from .speculative import NgramSpeculation
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None
    time_to_first_token: float
    duration: float
    cached_tokens: int = 0  # prompt tokens found in the cache (prefix reuse), not prefilled again

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class ChatResponse:
    content: str | None
    tool_calls: list[dict]
    finish_reason: str  # "stop" | "length" | "tool_calls"
    completion: Completion


class LLM:
    """A loaded checkpoint: config, parameters on device, tokenizer, chat format and engine."""

    def __init__(
        self,
        config: LlamaConfig,
        params: Params,
        tokenizer: Tokenizer | None,
        *,
        max_slots: int = 8,
        max_seq_len: int | None = None,
        decode_steps: int = 8,
        attention_impl: AttentionImpl = "xla",
        shardings: Any = None,
        path: Path | None = None,
        cache_dtype: Any = None,
        feature_major_decode: bool | None = None,
        adapter_names: Sequence[str | None] = (),
        speculation: NgramSpeculation | None = None,
        chat_template: str | None = None,
    ):
        """`adapter_names`: the names (e.g. served model ids) of the LoRA adapters `params` holds
        (lora.attach_many), slot by slot; None for an empty slot (`load_adapter` fills it).
        `speculation`: speculative decoding by prompt lookup (speculative.py), and
        `chat_template`, as `load`'s."""
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.path = path
        if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
            log.warning("the tokenizer has %d tokens but the model %d: prompts holding the extra ids are refused",
                        tokenizer.vocab_size, config.vocab_size)
        self.attention_impl = attention_impl
        self.engine = Engine(
            config, params, max_slots=max_slots, max_seq_len=max_seq_len, decode_steps=decode_steps,
            attention_impl=attention_impl, shardings=shardings, cache_dtype=cache_dtype,
            feature_major_decode=feature_major_decode, speculation=speculation,
        )
        if len(adapter_names) != self.engine.adapters:
            raise ValueError(f"{len(adapter_names)} adapter names for {self.engine.adapters} adapter slots")
        self._slot_names: list[str | None] = list(adapter_names)
        # Held while adapter names are resolved and requests queued (the server), and while an
        # adapter is loaded or unloaded: a slot is never refilled under a request still naming it.
        self.adapter_lock = threading.Lock()
        self.scheduler = Scheduler(self.engine, tokenizer) if tokenizer is not None else None
        self._chat_format = None
        if chat_template is not None:  # compiled now: a template that does not compile fails here
            from .chat_format import chat_format_for, read_chat_template

            self._chat_format = chat_format_for(self._require_tokenizer(), read_chat_template(chat_template))
        # Replicated output when sharded, so the host can read it in every process.
        self._logits_fn = jax.jit(self._logits_body, out_shardings=shardings.replicated if shardings else None)

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def chat_format(self):
        if self._chat_format is None:
            from .chat_format import chat_format_for

            self._chat_format = chat_format_for(self._require_tokenizer())
        return self._chat_format

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass token ids")
        return self.tokenizer

    # ---- raw model access (tests, notebooks) ----
    def _logits_body(self, params: Params, tokens: jax.Array) -> jax.Array:
        b, t = tokens.shape
        cache = KVCache.zeros(self.config, b, t, self.params["embed"].dtype)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        logits, _ = forward(params, self.config, tokens, positions, cache, attention_impl=self.attention_impl)
        return logits

    def logits(self, tokens: np.ndarray | Sequence[Sequence[int]], adapter: str | int = 0) -> np.ndarray:
        """Full-sequence float32 logits (B, T, V) for token ids (B, T) at positions 0..T-1, with
        LoRA adapter `adapter` (a name, or its 1-based slot; 0: the base model)."""
        tokens = jnp.asarray(np.asarray(tokens, dtype=np.int32))
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, length), got shape {tokens.shape}")
        adapter = self.adapter_index(adapter)
        params = self.params
        if self.engine.adapters:
            params = lora.route(params, np.full((tokens.shape[0],), adapter, np.int32))
        return np.asarray(self._logits_fn(params, tokens))

    # ---- prompts ----
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a raw prompt. Text may contain special tokens; BOS is added unless present."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            tok = self._require_tokenizer()
            ids = tok.encode(prompt, allow_special=True)
            if tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
                ids = [tok.bos_id] + ids
        else:
            ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError("the prompt is empty")
        check_token_ids(ids, self.config.vocab_size)
        return ids

    def _check_length(self, ids: list[int]) -> None:
        if len(ids) >= self.max_seq_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_seq_len} (prompt + output)"
            )

    # ---- generation ----
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        adapter: str | int | Sequence[str | int] = 0,
        **overrides: Any,
    ) -> Completion | list[Completion]:
        """Complete one prompt or a batch; a batch runs together, each sequence stopping on its own.
        `sampling` is one setting for all prompts or one per prompt; keyword overrides apply to all.
        `adapter`: the LoRA adapter (a name of `adapter_names`, or its 1-based slot; 0: none) for
        all prompts, or one per prompt."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("no prompts given")
        per_prompt = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(batch)
        if len(per_prompt) != len(batch):
            raise ValueError(f"{len(per_prompt)} sampling settings for {len(batch)} prompts")
        settings = [_sampling(sp, overrides) for sp in per_prompt]
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(batch)
        if len(adapters) != len(batch):
            raise ValueError(f"{len(adapters)} adapters for {len(batch)} prompts")
        ids = [self.encode_prompt(p) for p in batch]
        for i in ids:
            self._check_length(i)
        results = self._run(list(zip(ids, settings, map(self.adapter_index, adapters))))
        return results[0] if single else results

    def generate_stream(self, prompt: Prompt, sampling: SamplingParams | None = None, **overrides: Any) -> Iterator[Event]:
        """Yield events (new token ids, their text, finish reason) as the tokens are produced."""
        sampling = _sampling(sampling, overrides)
        ids = self.encode_prompt(prompt)
        self._check_length(ids)
        yield from self._stream(ids, sampling)

    def chat(
        self, messages: list[dict] | Sequence[list[dict]], tools: list[dict] | None = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *, adapter: str | int | Sequence[str | int] = 0, continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None, **overrides: Any,
    ) -> ChatResponse | list[ChatResponse]:
        """One assistant turn: content and parsed tool calls in OpenAI form. `messages` is one
        conversation, or a list of them, which run together as a batch (as vLLM's `LLM.chat`);
        `sampling` and `adapter` (as in generate) are then one for all or one per conversation.
        `continue_final_message`: the last message is the start of the assistant's answer, and the
        model goes on writing it (the response holds what it adds). `chat_template_kwargs`:
        variables for the chat template (for Llama 3.1: `tools_in_user_message`, `date_string`,
        `builtin_tools`)."""
        from .chat_format import tools_to_parse
        from .tool_calls import parse_tool_calls

        single = not messages or not isinstance(messages[0], (list, tuple))
        batch = [messages] if single else list(messages)
        settings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(batch)
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(batch)
        if len(settings) != len(batch) or len(adapters) != len(batch):
            raise ValueError(f"{len(settings)} sampling settings and {len(adapters)} adapters for "
                             f"{len(batch)} conversations")
        parsed = tools_to_parse(tools, chat_template_kwargs)
        jobs = []
        for conversation, sp, a in zip(batch, settings, adapters):
            ids = self._dialog_ids(conversation, tools, continue_final_message, chat_template_kwargs)
            self._check_length(ids)
            jobs.append((ids, _for_tool_parser(_sampling(sp, overrides), parsed), self.adapter_index(a)))
        replies = []
        for completion in self._run(jobs):
            content, calls = parse_tool_calls(completion.text, parsed) if parsed else (completion.text, [])
            replies.append(ChatResponse(content, calls, "tool_calls" if calls else completion.finish_reason,
                                        completion))
        return replies[0] if single else replies

    def _dialog_ids(self, messages: list[dict], tools: list[dict] | None, continue_final_message: bool,
                    chat_template_kwargs: dict[str, Any] | None) -> list[int]:
        return self.chat_format.encode_dialog(messages, tools, add_generation_prompt=not continue_final_message,
                                              continue_final_message=continue_final_message,
                                              chat_template_kwargs=chat_template_kwargs)

    def chat_stream(
        self, messages: list[dict], tools: list[dict] | None = None, sampling: SamplingParams | None = None,
        *, continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Iterator[dict]:
        """Yield OpenAI-style deltas ({"content": …} or {"tool_calls": […]}), then
        {"finish_reason": …, "usage": {"prompt_tokens": …, "completion_tokens": …, "cached_tokens": …}}."""
        from .chat_format import tools_to_parse
        from .tool_calls import StreamingToolParser

        sampling = _sampling(sampling, overrides)
        ids = self._dialog_ids(messages, tools, continue_final_message, chat_template_kwargs)
        self._check_length(ids)
        tools = tools_to_parse(tools, chat_template_kwargs)
        parser = StreamingToolParser(tools) if tools else None
        saw_call = False
        for event in self._stream(ids, _for_tool_parser(sampling, tools)):
            deltas = (parser.feed(event.text) if parser else [{"content": event.text}]) if event.text else []
            if event.finish_reason is not None and parser:
                deltas += parser.finish()
            for d in deltas:
                saw_call = saw_call or "tool_calls" in d
                yield d
            if event.finish_reason is not None:
                yield {
                    "finish_reason": "tool_calls" if saw_call else event.finish_reason,
                    "usage": {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                              "cached_tokens": event.cached_tokens},
                }

    def warmup(self, prompt_tokens: int = 64, progress: bool = True) -> None:
        """Compile the prefill for prompts of this length and the first decode window, with a bar.

        Later calls reuse the programs (and the persistent cache makes the next start fast)."""
        from tqdm import tqdm

        n = max(1, min(prompt_tokens, self.max_seq_len - self.engine.decode_steps - 1))
        slot = self.engine.free_slots()[0]
        with tqdm(total=2, desc="compiling", unit="program", disable=not progress, leave=False) as bar:
            self.engine.prefill(slot, [0] * n, SamplingParams.greedy(), 0)
            bar.update()
            self.engine.decode()
            bar.update()
        self.engine.release(slot)

    # ---- LoRA adapters ----
    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The names of the LoRA adapters loaded, in slot order."""
        return tuple(n for n in self._slot_names if n is not None)

    def adapter_index(self, adapter: str | int) -> int:
        """The engine's index of a loaded LoRA adapter, given by name or by its 1-based slot (0: none)."""
        if isinstance(adapter, str):
            if adapter not in self._slot_names:
                raise ValueError(f"no adapter {adapter!r}; loaded: {list(self.adapter_names)}")
            return self._slot_names.index(adapter) + 1
        if adapter != 0 and not (0 < adapter <= len(self._slot_names) and self._slot_names[adapter - 1] is not None):
            raise ValueError(f"no adapter in slot {adapter}; loaded: "
                             f"{ {n: k for k, n in enumerate(self._slot_names, 1) if n is not None} }")
        return adapter

    def load_adapter(self, name: str, directory: str | os.PathLike, *, replace: bool = False) -> int:
        """Read a LoRA adapter directory (scripts/finetune.py --out) and serve it as `name`, in a
        free adapter slot (`load(max_loras=N)` makes them) or, with `replace`, in place of the
        adapter of that name. Returns its slot. Nothing recompiles."""
        return self.install_adapter(name, *self.read_adapter(directory), replace=replace)

    def read_adapter(self, directory: str | os.PathLike) -> tuple[lora.Adapters, lora.LoraConfig]:
        """A LoRA adapter directory read for this model, on the devices adapters are kept on."""
        sharding = self.engine.shardings.replicated if self.engine.shardings is not None else None
        return lora.load(directory, self.config, sharding=sharding)

    def install_adapter(self, name: str, adapters: lora.Adapters, config: lora.LoraConfig, *,
                        replace: bool = False) -> int:
        """`load_adapter` of adapters already read (lora.load); run it between engine steps."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter's name must be a non-empty string, got {name!r}")
        if not self.engine.adapters:
            raise ValueError("this model holds no adapter slots: load it with max_loras=N (or lora_modules)")
        if jax.process_count() > 1:
            raise ValueError("adapters cannot change while the model runs on several processes")
        with self.adapter_lock:
            if name in self._slot_names:
                if not replace:
                    raise ValueError(f"an adapter named {name!r} is loaded already (unload it first, or replace it)")
                slot = self._slot_names.index(name) + 1
            else:
                busy = self.scheduler.adapters_in_use() if self.scheduler is not None else set()
                free = [k for k, n in enumerate(self._slot_names, 1) if n is None and k not in busy]
                if not free:
                    waiting = [k for k, n in enumerate(self._slot_names, 1) if n is None]
                    raise ValueError(f"all {len(self._slot_names)} adapter slots are taken"
                                     + (f" ({len(waiting)} freed, still running requests)" if waiting else "")
                                     + ": unload an adapter first, or load the model with more (max_loras)")
                slot = free[0]
            self.engine.set_params(lora.put(self.engine.params, slot, adapters, config))
            self.params = self.engine.params
            self.engine.forget_prefixes(slot)  # cached keys and values of the slot's former weights
            self._slot_names[slot - 1] = name
        return slot

    def unload_adapter(self, name: str) -> int:
        """Stop serving the adapter `name`; returns its slot, which takes another adapter once the
        requests already running on it have finished."""
        with self.adapter_lock:
            if name not in self._slot_names:
                raise ValueError(f"no adapter {name!r}; loaded: {list(self.adapter_names)}")
            slot = self._slot_names.index(name) + 1
            self._slot_names[slot - 1] = None
        return slot

    # ---- driving the scheduler ----
    def _run(self, jobs: list[tuple[list[int], SamplingParams, int]]) -> list[Completion]:
        sched = self.scheduler
        if sched is None:
            raise ValueError("this checkpoint has no tokenizer: it cannot detokenize")
        start = time.perf_counter()
        reqs: list[Request] = []
        try:
            reqs += [sched.add(Request(ids, sp, adapter=adapter)) for ids, sp, adapter in jobs]
            parts: dict[str, list[Event]] = {r.id: [] for r in reqs}
            while any(not r.done for r in reqs):
                for e in sched.step():
                    if e.request_id in parts:
                        parts[e.request_id].append(e)
        except BaseException:  # an invalid prompt, an interrupt, an engine failure: leave nothing queued
            for r in reqs:
                sched.cancel(r)
            raise
        return [_completion(r, parts[r.id], start) for r in reqs]

    def _stream(self, ids: list[int], sampling: SamplingParams) -> Iterator[Event]:
        sched = self.scheduler
        if sched is None:
            raise ValueError("this checkpoint has no tokenizer: it cannot detokenize")
        req = sched.add(Request(ids, sampling))
        try:
            while not req.done:
                for e in sched.step():
                    if e.request_id == req.id:
                        yield e
        finally:
            if not req.done:  # the consumer stopped early: free the slot
                sched.cancel(req)
                sched.step()


def _sampling(sampling: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    base = sampling or SamplingParams()
    return base.replace(**overrides) if overrides else base


def _for_tool_parser(sampling: SamplingParams, tools: list | None) -> SamplingParams:
    """`sampling` with special tokens kept in the text when tool calls are parsed from it (the
    parser reads markers such as <|python_tag|> and drops them from the content)."""
    return sampling.replace(skip_special_tokens=False) if tools and sampling.skip_special_tokens else sampling


def _completion(req: Request, events: list[Event], start: float) -> Completion:
    lps = [lp for e in events for lp in (e.logprobs or [])] if req.sampling.logprobs else None
    last = events[-1]
    ttft = (req.first_token_time or last.time) - start
    return Completion(
        text="".join(e.text for e in events), token_ids=list(req.output), finish_reason=last.finish_reason or "stop",
        prompt_tokens=len(req.prompt), logprobs=lps, time_to_first_token=ttft, duration=last.time - start,
        cached_tokens=req.cached_tokens,
    )


def default_dtype() -> str:
    """bfloat16 on accelerators; float32 on CPU, where XLA upcasts bf16 matmuls anyway."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path:
    """Persist compiled programs so a second start does not recompile."""
    from .paths import cache_dir

    path = Path(directory) if directory else cache_dir() / "jax-compilation-cache"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def load(
    path: str | os.PathLike | None = None,
    *,
    dtype: str | None = None,
    max_slots: int = 8,
    max_seq_len: int | None = 4096,
    decode_steps: int = 8,
    attention_impl: AttentionImpl = "xla",
    mesh: Any = None,
    compilation_cache: bool = True,
    progress: bool = True,
    adapters: str | os.PathLike | None = None,
    merge_adapters: bool = True,
    lora_modules: dict[str, str | os.PathLike] | None = None,
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
    quantize: str | None = None,
    quantize_lm_head: bool = False,
    cache_dtype: str | None = None,
    distributed: bool | dict | None = None,
    scan_layers: bool = False,
    feature_major_decode: bool | None = None,
    speculation: NgramSpeculation | dict | str | None = None,
    chat_template: str | os.PathLike | None = None,
) -> LLM:
    """Load a checkpoint onto the devices and return an `LLM`.

    `path`: an Orbax checkpoint written by `python -m convert`, or an HF directory, a Meta
    directory or a GGUF file (converted on first use and cached); None loads the demo model.
    `max_seq_len` bounds the KV cache (prompt + output) of each slot; None uses the model's.
    `mesh`: a `jax.sharding.Mesh` or a spec such as "tp=8" or "dp=2,tp=4".
    `adapters`: a LoRA adapter directory (scripts/finetune.py), merged into the weights, or
    applied on the fly with `merge_adapters=False`.
    `lora_modules`: {name: adapter directory}: all held at once over the base weights, each
    request picking one (`Request.adapter`, the server's `model` field) or none, in one batch.
    `max_loras`: adapter slots (at least as many as `lora_modules`); the empty ones take adapters
    later (`LLM.load_adapter`), on any target, up to rank `max_lora_rank` (default: 16, or the
    largest of `lora_modules`), each slot costing that rank's A and B for every layer weight.
    `quantize`: "int8" or "fp8" quantizes the layer weights while loading, one layer at a time
    (llama_jax/quantization.py); a checkpoint stored quantized loads quantized without it.
    `quantize_lm_head`: also quantize an untied LM head (with `quantize`'s mode, else the stored
    checkpoint's), one scale per vocabulary entry; by default it stays in `dtype`.
    `cache_dtype`: the KV cache's dtype (default: `dtype`); "int8" stores one scale per token and
    head beside int8 keys and values, about half the memory of bfloat16.
    `distributed`: join a multi-host run first (llama_jax/distributed.py): True reads the
    LLAMA_JAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID variables or the cluster's own, a dict gives
    them. Every process must then make the same calls; the checkpoint must already be converted.
    `scan_layers`: keep the layer weights stacked and run them with one `lax.scan` (compile time
    independent of depth, the layout training needs) instead of one array per layer, unrolled
    (the default: a scan slices, i.e. copies, every weight at every step, which costs decode
    speed wherever weights are read from memory at each token).
    `feature_major_decode`: decode with (out, in) copies of the layer weights (model.py), faster
    on XLA's CPU backend, for a second copy of the weights in memory; None (default): on for
    plain (unquantized, merged) weights on one CPU device, False saves the memory.
    `speculation`: speculative decoding by prompt lookup: an `NgramSpeculation`, or vLLM's
    speculative config as a dict or JSON text (`{"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_max": 4, "prompt_lookup_min": 2}`). Outputs are those of plain decoding;
    sequences that repeat earlier text (edits, quotes, structured data) come faster.
    `chat_template`: a Jinja chat template (a file or the template's text) for `chat` and the
    server, in place of the Llama 3.1 format or the checkpoint's own template.
    """
    from .distributed import initialize_from
    from .sources import resolve_checkpoint

    if speculation is not None and not isinstance(speculation, NgramSpeculation):
        speculation = NgramSpeculation.from_config(speculation)
    if chat_template is not None:  # before the weights: a missing file fails at once
        from .chat_format import read_chat_template

        chat_template = read_chat_template(chat_template)
    initialize_from(distributed)  # before anything starts the JAX backend
    if jax.process_count() > 1:
        mesh = mesh or f"tp={jax.device_count()}"
        if path is None or not checkpoint.is_checkpoint(path):
            raise ValueError("a multi-host load needs a converted llama-jax checkpoint on a shared filesystem")

    if compilation_cache:
        enable_compilation_cache()
    dtype = dtype or default_dtype()
    if dtype not in checkpoint.DTYPES:
        raise ValueError(f"dtype must be one of {checkpoint.DTYPES}, got {dtype!r}")
    if quantize is not None:
        quantization.check_mode(quantize)
    if cache_dtype not in (None, "int8", *checkpoint.DTYPES):
        raise ValueError(f"cache_dtype must be int8 or one of {checkpoint.DTYPES}, got {cache_dtype!r}")
    ckpt = resolve_checkpoint(path, progress=progress)
    config = checkpoint.read_config(ckpt)
    head_mode = None
    if quantize_lm_head:
        if config.tie_embeddings:
            raise ValueError(f"{ckpt}: the LM head is the embedding table (tied); quantize_lm_head needs an untied head")
        stored = checkpoint.read_quantization(ckpt)
        head_mode = quantize or (stored.mode if stored else None)
        if head_mode is None:
            raise ValueError("quantize_lm_head needs quantize='int8' or 'fp8', or a checkpoint stored quantized")
    shardings = None
    if mesh is not None:
        from .sharding import ModelShardings, make_mesh

        mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
        shardings = ModelShardings(config, mesh)
    params = checkpoint.restore_params(
        ckpt, dtype=dtype, shardings=shardings.params if shardings else None, progress=progress, quantize=quantize,
        stacked=scan_layers,
    )
    if head_mode is not None:
        params["lm_head"] = quantization.quantize_lm_head(params["lm_head"], head_mode)
    rep = shardings.replicated if shardings is not None else None
    if adapters is not None:
        params = lora.attach(params, adapters, config, merge_adapters=merge_adapters, sharding=rep)
    if lora_modules or max_loras:
        if max_lora_rank is None and max_loras:
            ranks = [lora.read_config(d)[0].rank for d in (lora_modules or {}).values()]
            max_lora_rank = max([16, *ranks])
        params = lora.attach_many(params, list((lora_modules or {}).values()), config, sharding=rep,
                                  slots=max_loras, max_rank=max_lora_rank)
    if shardings is not None:  # the tree as restored: quantized and LoRA weights are pytrees of arrays
        shardings = copy.copy(shardings)
        shardings.params = jax.tree.map(lambda a: a.sharding, params)
    tokenizer = load_tokenizer(ckpt)
    return LLM(
        config, params, tokenizer, max_slots=max_slots, max_seq_len=max_seq_len, decode_steps=decode_steps,
        attention_impl=attention_impl, shardings=shardings, path=Path(ckpt), cache_dtype=cache_dtype,
        feature_major_decode=feature_major_decode, speculation=speculation,
        adapter_names=(*(lora_modules or ()), *[None] * ((max_loras or 0) - len(lora_modules or ()))),
        chat_template=chat_template,
    )
