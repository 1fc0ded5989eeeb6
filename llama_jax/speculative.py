"""Speculative decoding by prompt lookup (n-gram drafts): vLLM's `"method": "ngram"`.

A sequence often repeats itself and its prompt: code being edited, a document being quoted or
summarised, JSON echoing the names it was given. When the last n tokens occurred earlier, the
tokens that followed them then are a guess (the draft) of what follows now. The engine feeds the
last token and the draft in one forward pass (`Engine.verify`) and samples each position in turn
with the ordinary sampler, keeping drafted tokens while they equal what was sampled: every token
is drawn from the model's own distribution at its position, from the same random stream as plain
decoding (seed and position), so outputs are those of plain decoding, greedy or sampled, and a
dispatch yields between 1 and `num_tokens` + 1 tokens for the cost of one pass over the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class NgramSpeculation:
    """Draft up to `num_tokens` tokens by matching the last `prompt_lookup_max` down to
    `prompt_lookup_min` tokens of a sequence against its earlier tokens (the latest match of the
    longest n wins). vLLM's names."""

    num_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")

    @classmethod
    def from_config(cls, config: str | dict[str, Any]) -> "NgramSpeculation":
        """From vLLM's `--speculative-config` (JSON text or a dict): `method` "ngram",
        `num_speculative_tokens`, `prompt_lookup_max`, `prompt_lookup_min`."""
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except json.JSONDecodeError as e:
                raise ValueError(f"the speculative config is not JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError("the speculative config must be a JSON object")
        config = dict(config)
        method = config.pop("method", "ngram")
        if method != "ngram":
            raise ValueError(f"speculative method {method!r} is not supported (only 'ngram', prompt lookup)")
        known = {"num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown speculative config keys {unknown} (known: method, {', '.join(sorted(known))})")
        if "num_speculative_tokens" not in config:
            raise ValueError("the speculative config needs num_speculative_tokens")
        values = {k: config[k] for k in known if k in config}
        for k, v in values.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{k} must be an integer, got {v!r}")
        # A bound given alone moves the other's default out of its way.
        low = values.get("prompt_lookup_min")
        high = values.get("prompt_lookup_max", max(cls.prompt_lookup_max, low or 0))
        return cls(num_tokens=values["num_speculative_tokens"], prompt_lookup_max=high,
                   prompt_lookup_min=low if low is not None else min(cls.prompt_lookup_min, high))

    def draft(self, tokens: np.ndarray) -> np.ndarray:
        """The draft for the sequence `tokens` (1-D): up to `num_tokens` tokens, maybe none."""
        return ngram_draft(tokens, self.num_tokens, self.prompt_lookup_min, self.prompt_lookup_max)


def ngram_draft(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> np.ndarray:
    """The (up to) `k` tokens that followed the latest earlier occurrence of the last n tokens of
    `tokens`, for the largest n in [min_n, max_n] that has one; empty if none does."""
    tokens = np.asarray(tokens)
    length = len(tokens)
    if length < min_n + 1:
        return tokens[:0]
    last = length - 1
    # Candidates end where the last token occurs earlier; then extend each match backwards.
    ends = np.flatnonzero(tokens[:last] == tokens[last])
    matched = np.ones(ends.shape, np.int64)
    alive = np.ones(ends.shape, bool)
    for j in range(1, max_n):
        ok = ends >= j
        ok[ok] = tokens[ends[ok] - j] == tokens[last - j]
        alive &= ok
        matched += alive
    best = matched.max(initial=0)
    if best < min_n:
        return tokens[:0]
    start = ends[matched == best][-1] + 1
    return tokens[start : start + k]


def add_arguments(parser: Any) -> None:
    """`--speculative-config` (vLLM's flag) on the parser or argument group of a script that
    loads a model; its value is an NgramSpeculation, or None."""

    def parse(text: str) -> NgramSpeculation:
        try:
            return NgramSpeculation.from_config(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parser.add_argument(
        "--speculative-config", type=parse, metavar="JSON",
        help='speculative decoding by prompt lookup, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
             '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' (outputs unchanged; faster where the text '
             "repeats earlier text)",
    )
