"""POST /v1/completions: raw prompts (text that may hold special tokens, or token ids; one or a
list), `echo`, legacy `logprobs` (tokens, token_logprobs, top_logprobs, text_offset), vLLM's
`prompt_logprobs`, streaming.

Choice `j * n + k` is sample k of prompt j. With `echo` and `logprobs`, the prompt's own
log-probabilities come from one full forward pass on the engine thread (the first token has none).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import numpy as np
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from ..scheduler import TokenLogprob
from .errors import APIError, bad_request
from .generation import (
    MIN_LOGPROB,
    ClientGone,
    ServerContext,
    events,
    sampling_params,
    sse,
    sse_response,
    truncate_prompt,
)
from .protocol import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    LegacyLogprobs,
    PromptLogprob,
    PromptLogprobs,
    Usage,
    new_id,
    now,
)


# Echoed prompt log-probabilities need the float32 logits of the whole (padded) prompt at once.
PROMPT_LOGPROBS_MAX_ELEMENTS = 1 << 26  # 256 MiB


def _prompt_logp(llm: Any, ids: list[int], adapter: str | int) -> np.ndarray:
    """(len(ids) - 1, V) float64 log-probabilities of the token after each prompt position."""
    n = len(ids)
    padded = max(16, 1 << (n - 1).bit_length())  # power-of-two lengths bound the compilations
    try:
        index = llm.adapter_index(adapter)
    except ValueError as e:  # this runs later, on the engine thread
        if isinstance(adapter, str) and adapter in llm.adapter_names:  # served, but every slot is in use
            raise APIError(503, f"{e}; retry later", code="overloaded") from None
        raise APIError(404, str(e), param="model", code="model_not_found") from None  # unloaded meanwhile
    logits = llm.logits([ids + [0] * (padded - n)], index)[0, : n - 1].astype(np.float64)
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def prompt_logprobs(llm: Any, ids: list[int], top: int, adapter: str | int = 0) -> list[TokenLogprob | None]:
    """Log-probability of each prompt token given the ones before it (None for the first)."""
    out: list[TokenLogprob | None] = [None]
    for i, row in enumerate(_prompt_logp(llm, ids, adapter), 1):
        best = np.argsort(-row)[:top] if top else []
        out.append(TokenLogprob(ids[i], float(row[ids[i]]), [(int(t), float(row[t])) for t in best]))
    return out


async def vllm_prompt_logprobs(ctx: ServerContext, ids: list[int], top: int, adapter: str | int) -> PromptLogprobs:
    """vLLM's `prompt_logprobs` of a prompt: per token after the first, the token itself and the
    `top` most likely ones there, with log-probability, rank and text (computed on the engine thread)."""
    check_prompt_logits(ctx, ids, "prompt_logprobs")

    def entries() -> PromptLogprobs:
        out: PromptLogprobs = [None]
        for i, row in enumerate(_prompt_logp(ctx.llm, ids, adapter), 1):
            order = np.argsort(-row, kind="stable")
            ranked = [(int(t), r) for r, t in enumerate(order[:top], 1)]
            ranked.append((ids[i], 1 + int(np.sum(row > row[ids[i]]))))
            out.append({str(t): PromptLogprob(logprob=max(float(row[t]), MIN_LOGPROB), rank=rank,
                                              decoded_token=ctx.token_text(t)) for t, rank in ranked})
        return out

    return await asyncio.wrap_future(ctx.worker.call(entries))


def check_prompt_logits(ctx: ServerContext, ids: list[int], param: str) -> None:
    """Refuse a prompt whose full logits would not fit PROMPT_LOGPROBS_MAX_ELEMENTS."""
    vocab = ctx.llm.config.vocab_size
    if 2 * len(ids) * vocab > PROMPT_LOGPROBS_MAX_ELEMENTS:
        raise bad_request(f"{param} is limited to prompts of {PROMPT_LOGPROBS_MAX_ELEMENTS // (2 * vocab)} tokens",
                          param)


class _Legacy:
    """Accumulates one choice's legacy logprobs object; offsets count characters of the choice's text."""

    def __init__(self, ctx: ServerContext):
        self.ctx = ctx
        self.offset = 0

    def build(self, lps: list[TokenLogprob | None], ids: list[int]) -> LegacyLogprobs:
        out = LegacyLogprobs()
        for tid, lp in zip(ids, lps):
            text = self.ctx.token_text(tid)
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            if lp is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            chosen = max(lp.logprob, MIN_LOGPROB)
            out.token_logprobs.append(chosen)
            top = {self.ctx.token_text(t): max(v, MIN_LOGPROB) for t, v in lp.top}
            top.setdefault(text, chosen)
            out.top_logprobs.append(top)
        return out


def _merge(a: LegacyLogprobs | None, b: LegacyLogprobs) -> LegacyLogprobs:
    if a is None:
        return b
    return LegacyLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                          top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)


async def create_completion(ctx: ServerContext, body: CompletionRequest, request: HTTPRequest) -> Response:
    adapter = ctx.check_model(body.model)
    prompts = body.prompts
    encoded: list[list[int]] = []
    for p in prompts:
        try:
            ids = await asyncio.to_thread(ctx.llm.encode_prompt, p)
        except ValueError as e:
            raise bad_request(str(e), "prompt") from None
        encoded.append(truncate_prompt(body, ids, ctx.max_seq_len))
    want_lp = body.logprobs is not None
    top = body.logprobs or 0
    constraint = await ctx.constraint(body)
    jobs = [
        (ids, sp)
        for ids in encoded
        for sp in sampling_params(body, len(ids), ctx.max_seq_len, prompt_param="prompt", logprobs=want_lp,
                                  top_logprobs=top, structured_output=constraint)
    ]
    echo_texts = [p if isinstance(p, str) and body.truncate_prompt_tokens is None else ctx.tokenizer.decode(ids)
                  for p, ids in zip(prompts, encoded)]
    echo_lps: list[list[TokenLogprob | None]] = [[None] * len(ids) for ids in encoded]
    if body.echo and want_lp:
        for j, ids in enumerate(encoded):
            check_prompt_logits(ctx, ids, "echo")
            echo_lps[j] = await asyncio.wrap_future(
                ctx.worker.call(lambda ids=ids: prompt_logprobs(ctx.llm, ids, top, adapter)))
    vllm_lps: list[PromptLogprobs | None] = [None] * len(encoded)
    if body.prompt_logprobs is not None:
        for j, ids in enumerate(encoded):
            vllm_lps[j] = await vllm_prompt_logprobs(ctx, ids, body.prompt_logprobs, adapter)
    sub = ctx.submit(jobs, adapter, body.priority)
    n = body.n
    total = len(jobs)
    legacy = [_Legacy(ctx) for _ in range(total)]

    def echo(i: int) -> tuple[str, LegacyLogprobs | None]:
        """The echoed prompt of choice i: its text and, with logprobs, its tokens."""
        j = i // n
        text = echo_texts[j] if body.echo else ""
        lps = legacy[i].build(echo_lps[j], encoded[j]) if body.echo and want_lp else None
        return text, lps

    rid, created = new_id("cmpl"), now()
    prompt_tokens = sum(len(ids) for ids in encoded)

    if not body.stream:
        texts, lps, reasons, counts, cached = [], [], ["stop"] * total, [0] * total, [0] * total
        stops: list[str | int | None] = [None] * total
        tokens: list[list[int]] = [[] for _ in range(total)]
        for i in range(total):
            t, lp = echo(i)
            texts.append(t)
            lps.append(lp if lp is not None else (LegacyLogprobs() if want_lp else None))
        try:
            async for i, ev in events(sub, request):
                texts[i] += ev.text
                tokens[i] += ev.token_ids
                if want_lp:
                    lps[i] = _merge(lps[i], legacy[i].build(list(ev.logprobs or []), ev.token_ids))
                counts[i] = ev.completion_tokens
                cached[i] = ev.cached_tokens
                reasons[i] = ev.finish_reason or reasons[i]
                stops[i] = ev.stop_reason if ev.finish_reason is not None else stops[i]
        except ClientGone:
            return Response(status_code=499)
        finally:
            sub.cancel()
        choices = [CompletionChoice(index=i, text=texts[i], logprobs=lps[i], finish_reason=reasons[i],
                                    stop_reason=stops[i], prompt_logprobs=vllm_lps[i // n],
                                    prompt_token_ids=encoded[i // n],
                                    token_ids=tokens[i]) for i in range(total)]
        usage = Usage.of(prompt_tokens, sum(counts), sum(cached[::n]))  # each prompt once: its first choice
        out = Completion(id=rid, created=created, model=ctx.model_name, choices=choices, usage=usage)
        return Response(body.dump(out), media_type="application/json")

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        c = Completion(id=rid, created=created, model=ctx.model_name, choices=choices, usage=usage)
        return sse(body.dump(c, chunk=True))

    async def stream() -> AsyncIterator[str]:
        counts, cached = [0] * total, [0] * total
        first = [True] * total  # each choice's first chunk carries its prompt's token ids

        def live() -> Usage | None:
            return Usage.of(prompt_tokens, sum(counts), sum(cached[::n])) if body.continuous_usage else None

        def prompt_ids(i: int) -> list[int] | None:
            was, first[i] = first[i], False
            return encoded[i // n] if was else None

        if body.echo:
            for i in range(total):
                text, lp = echo(i)
                yield chunk([CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=None,
                                              prompt_token_ids=prompt_ids(i))], live())
        async for i, ev in events(sub, request):
            lp = legacy[i].build(list(ev.logprobs or []), ev.token_ids) if want_lp else None
            cached[i] = ev.cached_tokens
            counts[i] = ev.completion_tokens
            if ev.finish_reason is None and not ev.text and not ev.token_ids:
                continue
            yield chunk([CompletionChoice(index=i, text=ev.text, logprobs=lp, finish_reason=ev.finish_reason,
                                          stop_reason=ev.stop_reason, prompt_token_ids=prompt_ids(i),
                                          token_ids=list(ev.token_ids))], live())
        if body.include_usage:
            yield chunk([], Usage.of(prompt_tokens, sum(counts), sum(cached[::n])))

    return sse_response(stream(), sub, "completion")
