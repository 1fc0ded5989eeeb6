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
        max_cpu_loras: int | None = None,
        speculation: NgramSpeculation | None = None,
        chat_template: str | None = None,
    ):
        """`adapter_names`: the names (e.g. served model ids) of the LoRA adapters `params` holds
        (lora.attach_many), slot by slot; None for an empty slot (`load_adapter` fills it).
        `max_cpu_loras`: how many adapters may be served in all (default: one per slot); those
        beyond the slots wait in host memory and take the least recently used free slot when a
        request needs them. `speculation`: speculative decoding by prompt lookup
        (speculative.py), and `chat_template`, as `load`'s."""
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
        slots = self.engine.adapters
        if len(adapter_names) != slots:
            raise ValueError(f"{len(adapter_names)} adapter names for {slots} adapter slots")
        named = [n for n in adapter_names if n is not None]
        if len(set(named)) != len(named):
            raise ValueError(f"adapter names repeat: {named}")
        self.max_cpu_loras = slots if max_cpu_loras is None else max_cpu_loras
        if self.max_cpu_loras < slots:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least the adapter slots ({slots})")
        # The adapters served, by name (weights on the host), and the one each slot holds: a slot
        # whose adapter was unloaded or replaced holds a stale one until it is written again.
        self._adapters: dict[str, _Adapter] = {}
        self._slots: list[_Adapter | None] = [None] * slots
        self._slot_used = [0] * slots  # when each slot last took a request (least recently used goes first)
        self._clock = 0
        for k, name in enumerate(adapter_names, 1):
            if name is not None:  # its weights are read back from the slot if another adapter needs it
                self._adapters[name] = self._slots[k - 1] = _Adapter(name, None, None)
        # Held while adapter names are resolved and requests queued (the server), and while an
        # adapter is loaded, unloaded or written into a slot: a slot is never refilled under a
        # request queued or running on it.
        self.adapter_lock = threading.Lock()
        self.scheduler = Scheduler(self.engine, tokenizer) if tokenizer is not None else None
        if self.scheduler is not None and slots:
            self.scheduler.place_adapter = self._place_request
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
        results = self._run(list(zip(ids, settings, map(self.resolve_adapter, adapters))))
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
            jobs.append((ids, _for_tool_parser(_sampling(sp, overrides), parsed), self.resolve_adapter(a)))
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
        """The names of the LoRA adapters served (in a slot or waiting on the host), in load order."""
        return tuple(self._adapters)

    def _current(self, k: int) -> bool:
        """Whether slot k (1-based) holds the adapter served under its name (not a stale one)."""
        held = self._slots[k - 1]
        return held is not None and self._adapters.get(held.name) is held

    def resolve_adapter(self, adapter: str | int) -> tuple[int, _Adapter | None]:
        """(slot, None) for the base model (0) or an adapter in a slot, given by name or 1-based
        slot; (0, adapter) for one that waits on the host for a slot (the scheduler gives it one
        before its request runs). Raises ValueError for an adapter not served."""
        if isinstance(adapter, str):
            entry = self._adapters.get(adapter)
            if entry is None:
                raise ValueError(f"no adapter {adapter!r}; loaded: {list(self.adapter_names)}")
            if entry not in self._slots:
                return 0, entry
            adapter = self._slots.index(entry) + 1
        elif adapter != 0 and not (0 < adapter <= len(self._slots) and self._current(adapter)):
            raise ValueError(f"no adapter in slot {adapter}; in slots: "
                             f"{ {e.name: k for k, e in enumerate(self._slots, 1) if self._current(k)} }")
        if adapter:
            self._touch(adapter)
        return adapter, None

    def _touch(self, slot: int) -> None:
        """Mark the slot used now (a slot to write another adapter into is the least recently used)."""
        self._clock += 1
        self._slot_used[slot - 1] = self._clock

    def adapter_index(self, adapter: str | int) -> int:
        """The slot (1-based; 0: the base model) of an adapter given by name or slot, written
        into one first if it waits on the host; call it between engine steps."""
        slot, entry = self.resolve_adapter(adapter)
        if entry is not None:
            with self.adapter_lock:
                slot = self._place(entry)
            if slot is None:
                raise ValueError(f"no adapter slot is free for {adapter!r}: all {len(self._slots)} run requests")
        return slot

    def _place_request(self, request: Request) -> bool:
        """The scheduler's hook: give a queued request's adapter a slot (False: none is free now)."""
        with self.adapter_lock:
            slot = self._place(request.lora)
            if slot is not None:
                request.adapter, request.lora = slot, None
        return slot is not None

    def _place(self, entry: _Adapter, evict: bool = True) -> int | None:
        """The slot holding `entry`, written into an empty slot, else (with `evict`) over the least
        recently used adapter, of slots no request is queued or running on; None if every slot
        is in use. Holds the adapter lock; runs between engine steps."""
        if entry in self._slots:
            slot = self._slots.index(entry) + 1
        else:
            busy = self.scheduler.adapters_in_use() if self.scheduler is not None else set()
            idle = [k for k in range(1, len(self._slots) + 1) if k not in busy]
            free = [k for k in idle if not self._current(k)]
            if not free and not (evict and idle):
                return None
            slot = free[0] if free else min(idle, key=lambda k: self._slot_used[k - 1])
            self._write(slot, entry)
        self._touch(slot)
        return slot

    def _write(self, slot: int, entry: _Adapter) -> None:
        old = self._slots[slot - 1]
        if old is not None and old.weights is None:  # its only copy is the slot's: kept for a later request
            old.weights, old.config = lora.take(self.engine.params, slot)
        self.engine.set_params(lora.put(self.engine.params, slot, entry.weights, entry.config))
        self.params = self.engine.params
        self.engine.forget_prefixes(slot)  # cached keys and values of the slot's former weights
        self._slots[slot - 1] = entry

    def load_adapter(self, name: str, directory: str | os.PathLike, *, replace: bool = False) -> int | None:
        """Read a LoRA adapter directory (scripts/finetune.py --out) and serve it as `name` or,
        with `replace`, in place of the adapter of that name. It goes into a free adapter slot
        (`load(max_loras=N)` makes them) or, when none is free, waits on the host for one
        (`max_cpu_loras`). Returns its slot (None: waiting). Nothing recompiles."""
        return self.install_adapter(name, *self.read_adapter(directory), replace=replace)

    def read_adapter(self, directory: str | os.PathLike) -> tuple[lora.Adapters, lora.LoraConfig]:
        """A LoRA adapter directory read for this model, into host memory."""
        adapters, config = lora.load(directory, self.config)
        return jax.device_get(adapters), config

    def install_adapter(self, name: str, adapters: lora.Adapters, config: lora.LoraConfig, *,
                        replace: bool = False) -> int | None:
        """`load_adapter` of adapters already read (lora.load); run it between engine steps.
        A replaced adapter's slot takes the new weights at once, under requests running on it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter's name must be a non-empty string, got {name!r}")
        if not self.engine.adapters:
            raise ValueError("this model holds no adapter slots: load it with max_loras=N (or lora_modules)")
        if jax.process_count() > 1:
            raise ValueError("adapters cannot change while the model runs on several processes")
        lora.check_fits(self.engine.params, adapters, config)
        with self.adapter_lock:
            old = self._adapters.get(name)
            if old is not None and not replace:
                raise ValueError(f"an adapter named {name!r} is loaded already (unload it first, or replace it)")
            if old is None and len(self._adapters) >= self.max_cpu_loras:
                raise ValueError(f"{len(self._adapters)} adapters are loaded, as many as this model serves "
                                 f"(max_cpu_loras): unload one first, or load the model with more")
            entry = _Adapter(name, jax.device_get(adapters), config)
            self._adapters[name] = entry
            if old in self._slots:
                slot = self._slots.index(old) + 1
                self._write(slot, entry)
                return slot
            return self._place(entry, evict=False)

    def unload_adapter(self, name: str) -> None:
        """Stop serving the adapter `name`; its slot takes another adapter once the requests
        already queued or running on it have finished."""
        with self.adapter_lock:
            if self._adapters.pop(name, None) is None:
                raise ValueError(f"no adapter {name!r}; loaded: {list(self.adapter_names)}")

    # ---- driving the scheduler ----
    def _run(self, jobs: list[tuple[list[int], SamplingParams, tuple[int, _Adapter | None]]]) -> list[Completion]:
        sched = self.scheduler
        if sched is None:
            raise ValueError("this checkpoint has no tokenizer: it cannot detokenize")
        start = time.perf_counter()
        reqs: list[Request] = []
        try:
            reqs += [sched.add(Request(ids, sp, adapter=slot, lora=entry)) for ids, sp, (slot, entry) in jobs]
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


@dataclasses.dataclass(eq=False)  # compared by identity: a replaced adapter is another one
class _Adapter:
    """A LoRA adapter the model serves: its weights on the host, written into a slot when needed
    (None while its slot holds the only copy: one given to the model loaded)."""

    name: str
    weights: lora.Adapters | None
    config: lora.LoraConfig | None


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
    max_cpu_loras: int | None = None,
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
    `max_loras`: adapter slots; the empty ones take adapters later (`LLM.load_adapter`), on any
    target, up to rank `max_lora_rank` (default: 16, or the largest of `lora_modules`), each slot
    costing that rank's A and B for every layer weight. `max_cpu_loras`: how many adapters may be
    served in all (default: the slots, or the `lora_modules` if more): those beyond the slots wait
    in host memory, and a request for one writes it over the least recently used adapter of a
    slot no request is using (vLLM's max_cpu_loras; one process only).
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
    modules = dict(lora_modules or {})
    slots = max_loras or len(modules)
    max_cpu_loras = max(slots, len(modules)) if max_cpu_loras is None else max_cpu_loras
    if max_cpu_loras and not slots:
        raise ValueError("max_cpu_loras needs adapter slots (max_loras or lora_modules)")
    if len(modules) > max_cpu_loras:
        raise ValueError(f"{len(modules)} lora_modules, more than max_cpu_loras={max_cpu_loras}")
    if max_cpu_loras > slots and jax.process_count() > 1:
        raise ValueError("adapters beyond the slots (max_cpu_loras) need one process: every slot change "
                         "would have to happen in all processes at once")
    if slots:
        if max_lora_rank is None and max_loras:
            ranks = [lora.read_config(d)[0].rank for d in modules.values()]
            max_lora_rank = max([16, *ranks])
        # More modules than slots: all of them are loaded below, into empty slots holding every target.
        given = list(modules.values()) if len(modules) <= slots else []
        params = lora.attach_many(params, given, config, sharding=rep, slots=max_loras, max_rank=max_lora_rank)
    if shardings is not None:  # the tree as restored: quantized and LoRA weights are pytrees of arrays
        shardings = copy.copy(shardings)
        shardings.params = jax.tree.map(lambda a: a.sharding, params)
    tokenizer = load_tokenizer(ckpt)
    names = list(modules) if len(modules) <= slots else []
    llm = LLM(
        config, params, tokenizer, max_slots=max_slots, max_seq_len=max_seq_len, decode_steps=decode_steps,
        attention_impl=attention_impl, shardings=shardings, path=Path(ckpt), cache_dtype=cache_dtype,
        feature_major_decode=feature_major_decode, speculation=speculation,
        adapter_names=(*names, *[None] * (slots - len(names))), max_cpu_loras=max_cpu_loras,
        chat_template=chat_template,
    )
    for name, directory in modules.items() if not names else ():  # the first fill the slots, the others wait
        llm.load_adapter(name, directory)
    return llm
