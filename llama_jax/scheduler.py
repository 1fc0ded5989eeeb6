"""Continuous batching: requests wait in a queue, take a free engine slot between decode calls,
stream their tokens out as events and give the slot back when they finish.

`step()` is the whole loop body: prefill (new requests into free slots, and the next chunk of
prompts too long for one call, within a token budget) → decode the running slots → hand out
tokens → release. A long prompt is prefilled a chunk per step, between decode dispatches, so the
running streams never wait for more than one step's prefill.
The batch API (`LLM.generate`) calls it until its requests are done; the HTTP server calls it
from its engine thread. Requests may be added or cancelled from other threads.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from .engine import Engine, PrefillJob, StepOutput
from .sampling import SamplingParams, seeds_for
from .structured import GrammarCompiler, Matcher
from .tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)


def check_token_ids(ids: list[int], vocab: int) -> None:
    """Refuse ids outside [0, vocab): they also come from a tokenizer that does not match the model."""
    if ids and not 0 <= min(ids) <= max(ids) < vocab:
        bad = next(t for t in ids if not 0 <= t < vocab)
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")


class QueueFull(RuntimeError):
    """The scheduler's queue is at its limit; the caller should retry later."""


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclasses.dataclass
class Event:
    """New output of one request: the tokens of one step and the text they completed."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "cancelled" | None while running
    prompt_tokens: int
    completion_tokens: int
    time: float
    cached_tokens: int = 0  # prompt tokens found in the slot's cache (prefix reuse)
    # vLLM's: the stop string or stop_token_ids entry that ended the request; None for the
    # model's own end tokens and every other ending.
    stop_reason: str | int | None = None


POLICIES = ("fcfs", "priority")  # the scheduling policies (vLLM's names)


@dataclasses.dataclass
class Request:
    prompt: list[int]
    sampling: SamplingParams
    on_event: Callable[[Event], None] | None = None
    id: str = ""
    adapter: int = 0  # the LoRA adapter slot to run (lora.attach_many; 0: the base model)
    priority: int = 0  # with the "priority" policy, lower values are admitted first (vLLM's)
    # An adapter in no slot yet (LLM.resolve_adapter): `Scheduler.place_adapter` writes it into
    # one (and sets `adapter`) before the request is admitted.
    lora: Any = None
    # Scheduler-side state.
    slot: int | None = None
    output: list[int] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    stop_reason: str | int | None = None  # as Event's
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    stop_ids: frozenset[int] = frozenset()  # tokens that end it: set at admission
    matcher: Matcher | None = None  # its place in sampling.structured_output's grammar
    cached_tokens: int = 0  # prompt tokens found in its slot's cache, not prefilled again
    seed: int = 0  # its sampling's seed (its own or a random one), set at admission
    preemptions: int = 0  # times it gave its slot to a request of a higher priority


class _StopText:
    """Emits text as it is produced, holding back any tail that may begin a stop string; the
    text ends before the first stop string found, or after it with `include_stop`."""

    def __init__(self, stops: tuple[str, ...], include_stop: bool = False):
        self.stops = stops
        self.include_stop = include_stop
        self.pending = ""
        self.hit: str | None = None  # the stop string found

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(i, k) for k, i in enumerate(self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            at, k = min(hits)  # the earliest; of stops found at one place, the first listed
            end = at + len(self.stops[k]) if self.include_stop else at
            out, self.pending, self.hit = self.pending[:end], "", self.stops[k]
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Scheduler:
    """`prefill_budget`: prompt tokens a step prefills (default: four of the engine's largest
    prefill buckets). A prompt gets one piece (at most the largest bucket) per step; prompts
    partly prefilled go first, then waiting requests while the budget lasts; the first piece of
    a step always runs.

    `prefix_reuse`: a request goes to the free slot whose cache holds the longest start of its
    prompt (the conversation so far, for the next turn of a chat), if that is at least
    MIN_PREFIX_REUSE tokens, and only the rest of its prompt is prefilled. Otherwise it goes
    where it destroys the least: among the free slots that decode computes anyway (below the
    power of two above the highest busy slot; slot 0 when none is busy), else among all free
    slots, an empty one, else the one released longest ago; lowest first on ties. There, if a
    busy slot holds at least MIN_PREFIX_REUSE more of its prompt than the best free slot (a
    system prompt a running request shares), those rows are copied in first and skipped
    (Engine.copy_prefix; not with slots split over dp). Without prefix reuse: the lowest free
    slot (decode computes the slots up to the highest live one)."""

    MIN_PREFIX_REUSE = 32

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, max_queue: int = 256, seed: int = 0,
                 prefill_budget: int | None = None, prefix_reuse: bool = True, policy: str = "fcfs"):
        if prefill_budget is not None and prefill_budget < 1:
            raise ValueError(f"prefill_budget must be >= 1, got {prefill_budget}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        # "fcfs": requests are admitted in arrival order; "priority": by Request.priority, then
        # arrival, and a queued request that finds no free slot preempts the running request
        # that comes last in that order, if it comes after it (see _preempt_for).
        self.policy = policy
        self.preemptions = 0  # running requests sent back to the queue
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget or 4 * engine.prefill_buckets[-1]
        self.prefix_reuse = prefix_reuse
        self.waiting: collections.deque[Request] = collections.deque()
        self.filling: dict[int, tuple[Request, PrefillJob]] = {}  # slot -> prompt partly prefilled
        self.running: dict[int, Request] = {}
        self._skipped_decode = False
        self._released: dict[int, int] = {}  # slot -> when its last request ended (a counter)
        self._ticks = itertools.count()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._rng = np.random.default_rng(seed)
        self._by_id: dict[str, Request] = {}  # admitted requests until their last event is out
        self._text: dict[str, tuple[IncrementalDecoder, _StopText]] = {}
        self.stop_ids = frozenset(tokenizer.stop_ids)
        self._grammars: GrammarCompiler | None = None
        # Gives a queued request's `lora` adapter a slot, between steps (LLM._place_request);
        # False when every slot is in use, and the request waits while others go ahead.
        self.place_adapter: Callable[[Request], bool] | None = None

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles requests' structured-output constraints (built on first use)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.engine.config.vocab_size, self.stop_ids)
        return self._grammars

    # ---- thread-safe entry points ----
    def add(self, request: Request) -> Request:
        n = len(request.prompt)
        limit = self.engine.max_seq_len
        if request.priority != 0 and self.policy != "priority":
            raise ValueError(f"a request priority needs the 'priority' scheduling policy (this one is {self.policy!r})")
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= limit:
            raise ValueError(f"the prompt has {n} tokens; the context holds {limit} (prompt + output)")
        if not 0 <= request.adapter <= self.engine.adapters:
            raise ValueError(f"adapter {request.adapter} is outside [0, {self.engine.adapters}] (the adapters loaded)")
        if request.lora is not None and self.place_adapter is None:
            raise ValueError("the request's adapter waits for a slot, and nothing gives it one (place_adapter)")
        vocab = self.engine.config.vocab_size
        check_token_ids(request.prompt, vocab)
        outside = [t for t, _ in request.sampling.logit_bias if t >= vocab]
        if outside:
            raise ValueError(f"logit_bias names token ids past the vocabulary ({vocab} tokens): {outside[:5]}")
        constraint = request.sampling.structured_output
        if constraint is not None and request.matcher is None:
            request.matcher = self.grammars.matcher(constraint)
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} requests already")
            request.id = request.id or f"req-{next(self._ids)}"
            if self.policy == "priority":
                self._queue_in_order(request)
            else:
                self.waiting.append(request)
        return request

    def _queue_in_order(self, request: Request) -> None:
        """Queue `request` after every queued request of the same or an earlier priority that
        arrived before it (holding the lock)."""
        key = (request.priority, request.arrival)
        later = (i for i, r in enumerate(self.waiting) if (r.priority, r.arrival) > key)
        self.waiting.insert(next(later, len(self.waiting)), request)

    def cancel(self, request: Request) -> None:
        request.cancelled = True

    def adapters_in_use(self) -> set[int]:
        """The LoRA adapters of the requests queued, prefilling or decoding."""
        with self._lock:
            waiting = list(self.waiting)
        return {r.adapter for r in (*waiting, *self.running.values(), *(r for r, _ in self.filling.values()))}

    def has_work(self) -> bool:
        return bool(self.waiting or self.filling or self.running)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # ---- the loop body (engine thread only) ----
    def step(self) -> list[Event]:
        """Admit, decode and hand out one round of tokens; the events of this step. If the engine
        fails (or the step is interrupted), the admitted requests are dropped, unfinished, the
        engine starts afresh and the error propagates; waiting requests stay queued."""
        try:
            return self._step()
        except BaseException:
            self._drop_admitted()
            raise

    def _drop_admitted(self) -> None:
        with self._lock:  # preempted requests wait in the queue, admitted already
            self.waiting = collections.deque(r for r in self.waiting if r.id not in self._by_id)
        for req in self._by_id.values():
            req.done, req.slot = True, None
        self._by_id.clear()
        self._text.clear()
        self.filling.clear()
        self.running.clear()
        self._skipped_decode = False
        self.engine.reset()

    def _step(self) -> list[Event]:
        events: list[Event] = []
        self._drop_cancelled(events)
        # First tokens are handed out as soon as the prefill samples them. A step that only
        # started short requests returns before decoding, so requests arriving together are
        # prefilled together instead of waiting out a decode dispatch; but never two steps in a
        # row, so running streams keep moving under steady arrivals. A step that prefilled a
        # chunk of a long prompt always decodes: the streams have waited a chunk already.
        self._place_adapters()
        admitted: list[Event] = []
        started_short = self._prefill(admitted)
        skip = started_short and not self._skipped_decode
        self._skipped_decode = skip
        if self.running and not skip:
            want_lp = any(r.sampling.logprobs for r in self.running.values())
            # A constrained request needs its next mask after each token: one step per dispatch.
            constrained = {slot: r.matcher for slot, r in self.running.items() if r.matcher is not None}
            if constrained:
                self.engine.constrain(list(constrained), np.stack([m.mask() for m in constrained.values()]))
            drafts = self._drafts(constrained)
            if drafts:
                out = self.engine.verify(drafts, want_logprobs=want_lp)
            else:
                out = self.engine.decode(want_logprobs=want_lp, steps=1 if constrained else None)
            for slot, req in list(self.running.items()):
                events.extend(self._consume(req, out, slot))
        self._dispatch(events)
        self._forget_done()
        return admitted + events

    def _drafts(self, constrained: dict[int, Matcher]) -> dict[int, list[int]]:
        """Speculative drafts of the running requests (not constrained ones: their masks are known
        one token ahead only), cut to what each may still output; none (plain decode) unless at
        least half of them have one, as a verify gives the others one token where decode gives
        `decode_steps`."""
        if self.engine.speculation is None:
            return {}
        drafts = {}
        for slot, req in self.running.items():
            if slot in constrained:
                continue
            room = self.engine.max_seq_len - len(req.prompt) - len(req.output)
            left = min(req.sampling.max_tokens - len(req.output), room) - 1  # the verify samples one anyway
            draft = self.engine.draft(slot)[: max(left, 0)]
            if draft.size:
                drafts[slot] = draft.tolist()
        return drafts if 2 * len(drafts) >= len(self.running) else {}

    def _dispatch(self, events: list[Event]) -> None:
        for e in events:
            req = self._find(e.request_id)
            if req is not None and req.on_event is not None:
                req.on_event(e)

    def _find(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def _drop_cancelled(self, events: list[Event]) -> None:
        with self._lock:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, "cancelled", events, [], "", None)
        for req in [*self.running.values(), *(r for r, _ in self.filling.values())]:
            if req.cancelled:
                self._finish(req, "cancelled", events, [], "", None)

    def _place_adapters(self) -> None:
        """Slots for the adapters of queued requests that wait for one, in queue order, while
        there are slots no request is queued or running on."""
        if self.place_adapter is None:
            return
        with self._lock:
            pending = [r for r in self.waiting if r.lora is not None and not r.cancelled]
        for req in pending:
            if not self.place_adapter(req):
                return

    def _prefill(self, events: list[Event]) -> bool:
        """One prefill call: the next chunk of each partly prefilled prompt, then waiting requests
        into free slots while the budget lasts. Requests whose prompt is complete start running;
        their first events are handed out at once (and appended to `events`). Whether the call
        started requests and held only whole prompts (no chunk of a longer one)."""
        chunk = self.engine.prefill_buckets[-1]
        work = list(self.filling.values())
        chunked = bool(work)
        spent = sum(min(chunk, len(job.prompt) - self.engine.filling[job.slot]) for _, job in work)
        free = self.engine.free_slots()
        taken: list[Request] = []
        preempted: list[int] = []
        with self._lock:
            unplaced: list[Request] = []  # their adapter waits for a slot: they keep their place
            while self.waiting and (spent < self.prefill_budget or not (work or taken)):
                req = self.waiting[0]
                if req.lora is not None:
                    unplaced.append(self.waiting.popleft())
                    continue
                if len(taken) == len(free):
                    slot = self._preempt_for(req)
                    if slot is None:
                        break
                    free.append(slot)
                    preempted.append(slot)
                taken.append(self.waiting.popleft())
                spent += min(chunk, len(req.prompt) + len(req.output))
            self.waiting.extendleft(reversed(unplaced))
        for slot in preempted:
            self.engine.release(slot)
        for req in taken:
            # A request preempted earlier comes back with its output, which is prefilled after its
            # prompt but for the last token: the engine feeds that to the next decode (Engine.resume).
            resumed = bool(req.output)
            if not resumed:
                self._by_id[req.id] = req
                self._text[req.id] = (
                    IncrementalDecoder(self.tokenizer, skip_special=req.sampling.skip_special_tokens),
                    _StopText(req.sampling.stop, req.sampling.include_stop_str_in_output))
                sp = req.sampling
                req.stop_ids = frozenset() if sp.ignore_eos else self.stop_ids | set(sp.stop_token_ids)
                req.seed = seeds_for([sp], self._rng)[0]
                if sp.max_tokens == 0:
                    done: list[Event] = []
                    self._finish(req, "length", done, [], "", None)
                    self._dispatch(done)
                    events.extend(done)
                    continue
            tokens = req.prompt + req.output[:-1]
            req.slot, cached, source = self._pick_slot(free, tokens, req.adapter)
            if not resumed:
                req.cached_tokens = cached
            if source is not None:  # before this call's prefill overwrites the source's rows
                self.engine.copy_prefix(source, req.slot, cached)
            free.remove(req.slot)
            first = req.matcher.mask() if req.matcher is not None and not resumed else None
            work.append((req, PrefillJob(req.slot, tokens, req.sampling, req.seed, self._stops_before_min(req), first,
                                         cached, req.adapter)))
        if not work:
            return False
        outs = self.engine.prefill_next([job for _, job in work])
        for (req, job), out in zip(work, outs):
            if out is None:
                self.filling[job.slot] = (req, job)
                continue
            self.filling.pop(job.slot, None)
            self.running[job.slot] = req
            if req.output:  # resumed: the token the prefill sampled is dropped
                self.engine.resume(job.slot, req.prompt, req.output, req.sampling.min_tokens)
                continue
            first = self._consume(req, out, 0)
            self._dispatch(first)
            events.extend(first)
        return not chunked and all(out is not None for out in outs)

    def _preempt_for(self, req: Request) -> int | None:
        """With the priority policy, the slot of the running request that comes last in priority
        order (highest value, then latest arrival) if it comes after `req`, which takes it; the
        request goes back to the queue with its output so far and, readmitted, is prefilled
        again (prompt and output: recomputed, as vLLM does) and goes on where it stopped. None
        otherwise. Requests still prefilling keep their slots. Holding the lock; the caller
        releases the slot on the engine."""
        if self.policy != "priority" or not self.running:
            return None
        slot, last = max(self.running.items(), key=lambda item: (item[1].priority, item[1].arrival))
        if last.priority <= req.priority:
            return None
        del self.running[slot]
        self._released[slot] = next(self._ticks)
        last.slot = None
        last.preemptions += 1
        self.preemptions += 1
        self._queue_in_order(last)
        return slot

    def _pick_slot(self, free: list[int], prompt: list[int], adapter: int) -> tuple[int, int, int | None]:
        """(slot, prompt tokens its cache will hold, the busy slot to copy them from or None) for a
        new request; see the class docstring."""
        if not self.prefix_reuse:
            return free[0], 0, None
        engine, least = self.engine, self.MIN_PREFIX_REUSE
        cached = {slot: engine.cached_prefix(slot, prompt, adapter) for slot in free}
        best = max(free, key=lambda slot: (cached[slot], -slot))
        busy = [s for s in range(engine.max_slots) if s not in free]
        if engine.can_copy_prefix and busy:
            held = {slot: engine.cached_prefix(slot, prompt, adapter) for slot in busy}
            source = max(busy, key=lambda slot: (held[slot], -slot))
            if held[source] >= max(least, cached[best] + least):  # worth a copy over reuse in place
                return self._least_loss(free, busy), held[source], source
        if cached[best] >= least:
            return best, cached[best], None
        return self._least_loss(free, busy), 0, None

    def _least_loss(self, free: list[int], busy: list[int]) -> int:
        """The free slot whose cache is least likely to be wanted again, among those decode
        computes anyway (the power of two above the highest busy slot) if any."""
        computed = 1 << max(busy).bit_length() if busy else 1
        candidates = [s for s in free if s < computed] or free
        return min(candidates, key=lambda s: (self.engine.held_tokens(s) > 0, self._released.get(s, -1), s))

    def _stops_before_min(self, req: Request) -> tuple[int, ...]:
        """The stop tokens the sampler bans until the request has `min_tokens` tokens."""
        if not req.sampling.min_tokens:
            return ()
        vocab = self.engine.config.vocab_size
        return tuple(sorted(t for t in req.stop_ids if 0 <= t < vocab))

    def _consume(self, req: Request, out: StepOutput, column: int) -> list[Event]:
        """Hand out the tokens in column `column` of `out` to `req`, stopping where it finishes."""
        if req.done:
            return []
        decoder, stop_text = self._text[req.id]
        sp = req.sampling
        new: list[int] = []
        lps: list[TokenLogprob] | None = [] if sp.logprobs else None
        text = ""
        finish = None
        hit = False
        for step in range(out.count(column)):
            token = int(out.tokens[step, column])
            if req.first_token_time is None:
                req.first_token_time = time.perf_counter()
            if token in req.stop_ids:
                finish = "stop"
                if token not in self.stop_ids:  # one of the request's stop_token_ids
                    req.stop_reason = token
                break
            if req.matcher is not None and not req.matcher.advance(token):
                # Only when every allowed token was banned (min_tokens holding back the end).
                log.warning("request %s: token %d is outside its grammar (%s); ending it", req.id, token,
                            req.matcher.error)
                finish = "stop"
                break
            new.append(token)
            req.output.append(token)
            if lps is not None and out.logprobs is not None:
                top = [(int(i), float(v)) for i, v in zip(out.top_ids[step, column], out.top_logprobs[step, column])]
                lps.append(TokenLogprob(token, float(out.logprobs[step, column]), top[: sp.top_logprobs]))
            piece, hit = stop_text.push(decoder.add(token))
            text += piece
            if hit:
                finish, req.stop_reason = "stop", stop_text.hit
                break
            if req.matcher is not None and req.matcher.finished:  # nothing can follow
                finish = "stop"
                break
            if len(req.output) >= sp.max_tokens or len(req.prompt) + len(req.output) >= self.engine.max_seq_len:
                finish = "length"
                break
        if finish is None:
            return [self._event(req, new, text, lps, None)]
        if not hit:  # the text held back (an unfinished character, a stop string's prefix) is output
            text += stop_text.push(decoder.flush())[0] + stop_text.flush()
        events: list[Event] = []
        self._finish(req, finish, events, new, text, lps)
        return events

    def _finish(self, req: Request, reason: str, events: list[Event], new: list[int], text: str,
                lps: list[TokenLogprob] | None) -> None:
        req.done = True
        self._by_id[req.id] = req
        if req.slot is not None:
            self.running.pop(req.slot, None)
            self.filling.pop(req.slot, None)
            self.engine.release(req.slot)
            self._released[req.slot] = next(self._ticks)
            req.slot = None
        events.append(self._event(req, new, text, lps, reason))

    def _event(self, req: Request, new: list[int], text: str, lps, reason: str | None) -> Event:
        return Event(req.id, new, text, lps, reason, len(req.prompt), len(req.output), time.perf_counter(),
                     req.cached_tokens, req.stop_reason if reason is not None else None)

    def _forget_done(self) -> None:
        for rid in [rid for rid, r in self._by_id.items() if r.done]:
            self._by_id.pop(rid)
            self._text.pop(rid, None)
