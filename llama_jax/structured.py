"""Structured output: constrain what a request may generate to a JSON schema, any JSON object, a
regular expression, a list of choices or a grammar.

The grammars are compiled and followed by llguidance (the engine behind vLLM's `guidance`
backend and llama.cpp's `%llguidance`): after each token, the request's matcher gives the set of
tokens that keep the output inside the grammar, as a bitmask over the vocabulary, and the sampler
gives every other token zero probability. Once the grammar is complete, only the end-of-turn
tokens stay allowed; once nothing can follow, the request ends.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import llguidance

    from .tokenizer import Tokenizer

# A compiled grammar is kept (and copied for each request) for this many distinct grammars.
CACHE_SIZE = 64
# Whitespace JSON may hold between tokens: up to 32 characters at a time, enough for any sane
# indentation, but no endless run of newlines from a model that has lost its way. A schema's
# "x-guidance" key overrides it (llguidance's JSON options, e.g. {"whitespace_flexible": true}).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,32}"


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """What the output must match: exactly one of the fields, as vLLM's `structured_outputs`.

    - `json`: a JSON schema (a dict, or its JSON text);
    - `json_object`: any JSON object (OpenAI's JSON mode);
    - `regex`: a regular expression the whole output matches;
    - `choice`: one of these strings, exactly;
    - `grammar`: a Lark or GBNF (llama.cpp) grammar, as llguidance reads them.
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured output needs exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")
        if isinstance(self.json, dict):  # kept as text, so the dataclass stays hashable; key order
            object.__setattr__(self, "json", json.dumps(self.json))  # is the output's order
        if self.json is not None:
            try:
                schema = json.loads(self.json)
            except (TypeError, ValueError) as e:
                raise ValueError(f"structured output json is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("structured output json must be a JSON schema (an object)")
        if self.choice is not None:
            choices = (self.choice,) if isinstance(self.choice, str) else tuple(self.choice)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise ValueError("structured output choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", choices)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"structured output {name} must be a non-empty string")

    def grammar_text(self) -> str:
        """The llguidance grammar of this constraint."""
        from llguidance import LLMatcher, grammar_from

        options = {"whitespace_pattern": JSON_WHITESPACE}
        if self.json is not None:
            return LLMatcher.grammar_from_json_schema(self.json, defaults=options)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        try:
            return grammar_from("grammar", self.grammar)
        except ValueError as e:
            raise ValueError(f"structured output grammar: {e}") from None


class Matcher:
    """One request's place in its grammar."""

    def __init__(self, matcher: "llguidance.LLMatcher", vocab_size: int):
        self._m = matcher
        self.vocab_size = vocab_size

    def mask(self) -> np.ndarray:
        """Tokens allowed next, as a bitmask: (ceil(V / 32),) int32, bit t % 32 of word t // 32."""
        words = np.frombuffer(self._m.compute_bitmask(), np.int32)
        return words[: mask_words(self.vocab_size)].copy()

    def advance(self, token: int) -> bool:
        """Take `token` as generated; False if the grammar does not allow it."""
        return self._m.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar admits no further token: the output is complete."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error()


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class GrammarCompiler:
    """Compiles constraints into matchers for one tokenizer and model vocabulary; thread-safe.

    `vocab_size` is the model's (its embedding table may hold ids past the tokenizer's, which no
    grammar allows). `end_ids` are the tokens allowed once the grammar is complete; with none in
    the vocabulary, a request ends when its grammar is complete or at max_tokens."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, end_ids: frozenset[int] | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.end_ids = sorted(t for t in (tokenizer.stop_ids if end_ids is None else end_ids) if t < vocab_size)
        self._lock = threading.Lock()
        self._lltokenizer: "llguidance.LLTokenizer | None" = None
        self._compiled: collections.OrderedDict[StructuredOutput, "llguidance.LLMatcher"] = collections.OrderedDict()

    def matcher(self, constraint: StructuredOutput) -> Matcher:
        """A fresh matcher at the start of `constraint`'s grammar. Raises ValueError (with
        llguidance's reason) for an invalid schema, regex or grammar."""
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is not None:
                self._compiled.move_to_end(constraint)
                return Matcher(compiled.deep_copy(), self.vocab_size)
        import llguidance

        text = constraint.grammar_text()
        m = llguidance.LLMatcher(self._llg_tokenizer(), text, log_level=0)
        if m.is_error():
            raise ValueError(f"invalid structured output: {m.get_error()}")
        with self._lock:
            self._compiled[constraint] = m
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
            return Matcher(m.deep_copy(), self.vocab_size)

    def _llg_tokenizer(self) -> "llguidance.LLTokenizer":
        with self._lock:
            if self._lltokenizer is None:
                import llguidance

                if self.tokenizer.vocab_size > self.vocab_size:  # its encoder would give ids the model lacks
                    raise ValueError(f"structured output needs the model's vocabulary ({self.vocab_size} ids) to "
                                     f"hold the tokenizer's ({self.tokenizer.vocab_size})")
                # llguidance needs an end token: without one, an extra id no mask reaches.
                ends = self.end_ids or [self.vocab_size]
                vocab = _Vocabulary(self.tokenizer, self.vocab_size, self.vocab_size + (not self.end_ids), ends[0])
                self._lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), eos_token=ends)
            return self._lltokenizer


class _Vocabulary:
    """Our tokenizer in the shape llguidance.TokenizerWrapper reads: every id's bytes (special
    tokens marked with a leading 0xFF, so no grammar text can produce them) and an encoder."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, size: int, eos: int):
        """Ids below the model's `vocab_size` that the tokenizer has take their bytes; the rest,
        up to `size`, are empty: never allowed."""
        self._tokenizer = tokenizer
        special = tokenizer.special_ids
        n = min(tokenizer.vocab_size, vocab_size)
        self.tokens = [b"\xff" + tokenizer.token_bytes(i) if i in special else tokenizer.token_bytes(i)
                       for i in range(n)]
        self.tokens += [b""] * (size - n)
        self.special_token_ids = sorted(t for t in special if t < vocab_size)
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # TokenizerWrapper probes with bytes; we take text
            raise TypeError("text expected")
        return self._tokenizer.encode(text)
