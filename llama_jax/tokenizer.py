"""Tokenizers: Llama 3 (tiktoken, `tokenizer.model`), Hugging Face `tokenizer.json`, and the
tokenizer embedded in a GGUF file, behind one interface, plus incremental detokenization.

Every tokenizer here maps each token id to a fixed byte string (`token_bytes`), so decoding is
concatenation: `decode_bytes(a + b) == decode_bytes(a) + decode_bytes(b)`. That is what lets
`IncrementalDecoder` stream text that joins up to exactly `decode(ids)`.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import importlib.util
import json
import re
import struct
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Sequence

# The GGUF tokenizer metadata that `convert gguf` writes beside a checkpoint (see checkpoint.py).
GGUF_TOKENIZER_FILE = "gguf_tokenizer.json"

if TYPE_CHECKING:
    import tokenizers

__all__ = [
    "HFTokenizer",
    "IncrementalDecoder",
    "TiktokenTokenizer",
    "Tokenizer",
    "TokenizerError",
    "llama3_tokenizer",
    "load_tokenizer",
    "read_gguf_metadata",
]


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupt or of a kind this module does not read."""


class Tokenizer(ABC):
    """What the generation loop, the chat formats and the server need from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    stop_ids: frozenset[int]  # ids that end generation
    special_tokens: dict[str, int]
    chat_template: str | None
    # SentencePiece-style decoders drop the space that starts the decoded text.
    strips_leading_space: bool = False

    @abstractmethod
    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token text stays plain text unless `allow_special`."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token: its text)."""

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens decode to their text, invalid UTF-8 to U+FFFD."""
        text = self.decode_bytes(ids).decode("utf-8", errors="replace")
        if self.strips_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.special_tokens.values())

    @functools.cached_property
    def _id_of_bytes(self) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        for i in range(self.vocab_size):
            out.setdefault(self.token_bytes(i), i)
        return out

    def token_id(self, text: str) -> int | None:
        """Id of a special token or of a string that is exactly one vocabulary entry, else None."""
        if text in self.special_tokens:
            return self.special_tokens[text]
        return self._id_of_bytes.get(text.encode("utf-8"))

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")


# --------------------------------------------------------------------------------------------
# Llama 3: tiktoken over the 128,000 BPE ranks of tokenizer.model
# --------------------------------------------------------------------------------------------

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
)
_LLAMA3_NUM_SPECIALS = 256
# tiktoken panics on very long inputs and is quadratic on long runs of one character class, so
# input is encoded in pieces. The piece boundaries are the ones Meta's tokenizer uses, so that
# the ids stay equal to Meta's on any input.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    names = list(_LLAMA3_NAMED_SPECIALS)
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + _LLAMA3_NUM_SPECIALS - len(names))]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def _is_rank_line(line: bytes) -> bool:
    try:
        token, rank = line.split()
        binascii.a2b_base64(token, strict_mode=True)
        int(rank)
        return True
    except (ValueError, binascii.Error):
        return False


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """The `base64-token rank` lines of a tiktoken BPE file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {path}") from None
    ranks: dict[bytes, int] = {}
    lines = raw.splitlines()
    try:
        for line in lines:
            if line.strip():
                token, rank = line.split()
                ranks[binascii.a2b_base64(token, strict_mode=True)] = int(rank)
    except (ValueError, binascii.Error):
        lineno = next(n for n, line in enumerate(lines, 1) if line.strip() and not _is_rank_line(line))
        raise TokenizerError(
            f"{path}: line {lineno} is not a tiktoken `<base64> <rank>` entry "
            "(a SentencePiece tokenizer.model is not supported; use the checkpoint's tokenizer.json)"
        ) from None
    if not ranks:
        raise TokenizerError(f"{path}: empty tokenizer file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: BPE ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def _split_long_runs(text: str) -> list[str]:
    """Pieces of `text` with at most _MAX_RUN_CHARS consecutive whitespace or non-whitespace
    characters each; a run is cut every _MAX_RUN_CHARS characters from its start."""
    pieces: list[str] = []
    start = 0
    for m in re.finditer(r"\s+|\S+", text):
        for cut in range(m.start() + _MAX_RUN_CHARS, m.end(), _MAX_RUN_CHARS):
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return pieces


class TiktokenTokenizer(Tokenizer):
    """The Llama 3 tokenizer: tiktoken BPE with Llama 3's split pattern and 256 special tokens."""

    chat_template = None

    def __init__(self, model_path: str | Path):
        import tiktoken

        path = Path(model_path)
        ranks = read_tiktoken_ranks(path)
        self.path = path
        self.special_tokens = llama3_special_tokens(len(ranks))
        self._encoding = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self._bytes = [b""] * (len(ranks) + len(self.special_tokens))
        for token, rank in ranks.items():
            self._bytes[rank] = token
        for name, i in self.special_tokens.items():
            self._bytes[i] = name.encode()
        self.vocab_size = len(self._bytes)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.stop_ids = frozenset(self.special_tokens[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        allowed: Any = "all" if allow_special else set()
        ids = [self.bos_id] if bos else []
        for i in range(0, len(text), _MAX_ENCODE_CHARS):
            chunk = text[i : i + _MAX_ENCODE_CHARS]
            pieces = [chunk] if len(chunk) <= _MAX_RUN_CHARS else _split_long_runs(chunk)
            for piece in pieces:
                ids += self._encoding.encode(piece, allowed_special=allowed, disallowed_special=())
        if eos:
            ids.append(self.eos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        return self._bytes[token_id]

    def token_id(self, text: str) -> int | None:
        if text in self.special_tokens:
            return self.special_tokens[text]
        try:
            return self._encoding.encode_single_token(text.encode("utf-8"))
        except KeyError:
            return None


def _llama_models_tokenizer_path() -> Path:
    # find_spec locates the installed package without running its code.
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "no tokenizer given and the default Llama 3 tokenizer comes from the `llama-models` package, "
            "which is not installed: pip install llama-models"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise TokenizerError(f"the installed llama-models package has no Llama 3 tokenizer at {path}")
    return path


@functools.lru_cache(maxsize=1)
def llama3_tokenizer() -> TiktokenTokenizer:
    """The Llama 3 tokenizer shipped in the `llama-models` package (loaded once)."""
    return TiktokenTokenizer(_llama_models_tokenizer_path())


# --------------------------------------------------------------------------------------------
# Hugging Face tokenizers: tokenizer.json, or a GGUF vocabulary rebuilt as one
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _walk_decoders(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [d for child in node.get("decoders", []) for d in _walk_decoders(child)]
    return [node]


# Tokens after which a chat model stops, when the tokenizer has them as special tokens.
_END_MARKERS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>",
                "<|end|>", "</s>")
_BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>")
_EOS_GUESSES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer: byte-level BPE (Llama 3, GPT-2 style, SmolLM2) or
    SentencePiece-style BPE (▁ for spaces, <0xNN> byte fallback)."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos: str | int | None = None,
        eos: str | int | None = None,
        extra_stop_ids: Sequence[int] = (),
        chat_template: str | None = None,
        source: str = "tokenizer",
    ):
        from tokenizers import Tokenizer as _HFTok

        self.source = source
        self._tok = tokenizer
        # A second copy encodes special-token text as plain text (encode_special_tokens is a setting
        # of the object, so one copy per mode keeps encode free of shared mutable state).
        self._plain = _HFTok.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self.chat_template = chat_template
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self._bytes = self._token_byte_table(added)

        def lookup(token: str | int | None, guesses: Sequence[str]) -> int | None:
            if isinstance(token, int):
                self._check_id(token)
                return token
            if token is not None:
                i = tokenizer.token_to_id(token)
                if i is None:
                    raise TokenizerError(f"{source}: special token {token!r} is not in the vocabulary")
                return i
            return next((self.special_tokens[g] for g in guesses if g in self.special_tokens), None)

        self.bos_id = lookup(bos, _BOS_GUESSES)
        self.eos_id = lookup(eos, _EOS_GUESSES)
        stops = {self.special_tokens[t] for t in _END_MARKERS if t in self.special_tokens}
        stops |= {i for i in (self.eos_id, *extra_stop_ids) if i is not None}
        self.stop_ids = frozenset(stops)

    def _token_byte_table(self, added: dict[int, Any]) -> list[bytes]:
        decoder = self._tok.decoder
        decoders = _walk_decoders(json.loads(decoder.__getstate__()) if decoder is not None else None)
        kinds = {d.get("type") for d in decoders}
        vocab = self._tok.get_vocab(with_added_tokens=False)
        table = [b""] * self.vocab_size
        if "ByteLevel" in kinds:
            alphabet = _byte_level_alphabet()
            for token, i in vocab.items():
                table[i] = bytes(alphabet[c] for c in token) if all(c in alphabet for c in token) else token.encode()
        elif kinds & {"Metaspace", "Replace", "ByteFallback"}:
            byte_token = re.compile(r"<0x([0-9A-Fa-f]{2})>")
            for token, i in vocab.items():
                m = byte_token.fullmatch(token)
                table[i] = bytes([int(m.group(1), 16)]) if m else token.replace("\u2581", " ").encode()
            self.strips_leading_space = any(
                (d.get("type") == "Strip" and d.get("start", 0) >= 1)
                or (d.get("type") == "Metaspace" and d.get("prepend_scheme", "always") != "never")
                for d in decoders
            )
        else:
            raise TokenizerError(
                f"{self.source}: decoder {sorted(k for k in kinds if k) or 'none'} is not supported "
                "(byte-level or SentencePiece-style BPE only)"
            )
        for i, tok in added.items():
            table[i] = tok.content.encode()
        return table

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        tok = self._tok if allow_special else self._plain
        ids = tok.encode(text, add_special_tokens=False).ids
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{self.source}: this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise ValueError(f"{self.source}: this tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        return self._bytes[token_id]

    @classmethod
    def from_file(cls, tokenizer_json: str | Path) -> HFTokenizer:
        """A tokenizer.json, with tokenizer_config.json (special tokens, chat template) and
        generation_config.json (extra EOS ids) from the same directory when present."""
        from tokenizers import Tokenizer as _HFTok

        path = Path(tokenizer_json)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            tok = _HFTok.from_file(str(path))
        except Exception as e:  # the Rust loader raises plain Exception on bad JSON
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None
        config = _read_json(path.parent / "tokenizer_config.json")
        gen = _read_json(path.parent / "generation_config.json")

        def token_name(value: Any) -> str | None:
            return value.get("content") if isinstance(value, dict) else value

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = path.parent / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        gen_eos = gen.get("eos_token_id")
        return cls(
            tok,
            bos=token_name(config.get("bos_token")),
            eos=token_name(config.get("eos_token")),
            extra_stop_ids=gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else [],
            chat_template=template,
            source=str(path),
        )

    @classmethod
    def from_gguf(cls, gguf_path: str | Path) -> HFTokenizer:
        """The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.model` "gpt2")."""
        path = Path(gguf_path)
        return cls.from_gguf_metadata(read_gguf_metadata(path, prefix="tokenizer."), path)

    @classmethod
    def from_gguf_json(cls, json_path: str | Path) -> HFTokenizer:
        """The GGUF tokenizer metadata that `convert gguf` saves beside a checkpoint."""
        path = Path(json_path)
        doc = _read_json(path)
        if doc.get("format") != "gguf-tokenizer" or not isinstance(doc.get("metadata"), dict):
            raise TokenizerError(f"{path}: not a gguf-tokenizer document")
        return cls.from_gguf_metadata(doc["metadata"], path)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], path: Path) -> HFTokenizer:
        """From GGUF `tokenizer.*` metadata; `path` names the source in errors."""
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(
                f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') GGUF tokenizers are supported"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in meta:
                raise TokenizerError(f"{path}: GGUF metadata has no {key}")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        tok = _gguf_bpe(tokens, types, meta["tokenizer.ggml.merges"], meta.get("tokenizer.ggml.pre"), path)

        def id_at(key: str) -> int | None:
            i = meta.get(key)
            if i is not None and not 0 <= i < len(tokens):
                raise TokenizerError(f"{path}: {key} = {i} is outside the vocabulary of {len(tokens)}")
            return i

        eot = id_at("tokenizer.ggml.eot_token_id")
        return cls(
            tok,
            bos=id_at("tokenizer.ggml.bos_token_id"),
            eos=id_at("tokenizer.ggml.eos_token_id"),
            extra_stop_ids=[eot] if eot is not None else [],
            chat_template=meta.get("tokenizer.chat_template"),
            source=str(path),
        )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` (llama.cpp's names and groups).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_GGUF_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("gpt2", "mpt", "olmo"), (_GPT2_SPLIT,)),
    # SmolLM2 and the StarCoder family isolate every digit first.
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    (r"\p{N}", _GPT2_SPLIT)),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"), (LLAMA3_PATTERN,)),
}


def _gguf_bpe(
    tokens: list[str], types: list[int], merges: list[str], pre: str | None, path: Path
) -> tokenizers.Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _HFTok

    if len(types) != len(tokens):
        raise TokenizerError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    alphabet = _byte_level_alphabet()
    spell = {b: c for c, b in alphabet.items()}
    # Vocabulary entries are stored in the byte-level alphabet; a few files store a token in plain
    # text instead, so re-spell those.
    vocab = {
        t if all(c in alphabet for c in t) else "".join(spell[b] for b in t.encode()): i for i, t in enumerate(tokens)
    }
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep or not a or not b:
            raise TokenizerError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((a, b))
    splits = _GGUF_SPLITS.get(pre or "")
    if splits is None:
        warnings.warn(f"{path}: unknown tokenizer.ggml.pre {pre!r}; splitting words like GPT-2", stacklevel=3)
        splits = _GGUF_SPLITS["gpt2"]
    # Llama 3 vocabularies follow tiktoken: a word already in the vocabulary is one token.
    tok = _HFTok(models.BPE(vocab=vocab, merges=pairs, ignore_merges=splits == (LLAMA3_PATTERN,)))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # llama.cpp token types: 3 = control (special), 4 = user-defined (matched whole, not special).
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3 and t in vocab]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4 and t in vocab]
    )
    return tok


# --------------------------------------------------------------------------------------------
# GGUF metadata (the key/value header only; tensors are left alone)
# --------------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | Path, prefix: str = "") -> dict[str, Any]:
    """Key/value metadata of a GGUF file (keys starting with `prefix`; others are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        try:
            return _read_gguf_kv(f, prefix, path.stat().st_size)
        except (struct.error, EOFError, UnicodeDecodeError, OverflowError, MemoryError, RecursionError) as e:
            raise TokenizerError(f"{path}: truncated or corrupt GGUF metadata ({type(e).__name__}: {e})") from None
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None


def _read_gguf_kv(f: BinaryIO, prefix: str, size: int) -> dict[str, Any]:
    if f.read(4) != b"GGUF":
        raise TokenizerError("not a GGUF file (bad magic)")
    (version,) = struct.unpack("<I", _read(f, 4))
    endian = "<"
    if version > 0xFFFF:  # written big-endian
        endian, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        raise TokenizerError(f"unsupported GGUF version {version}")
    _n_tensors, n_kv = struct.unpack(endian + "QQ", _read(f, 16))

    def scalar(fmt: str) -> Any:
        return struct.unpack(endian + fmt, _read(f, struct.calcsize(fmt)))[0]

    def count() -> int:
        n = scalar("Q")
        if n > size:  # every element takes at least a byte: a corrupt length, not a real one
            raise TokenizerError(f"length {n} exceeds the file size {size}")
        return n

    def string() -> str:
        return _read(f, count()).decode("utf-8")

    def value(vtype: int, keep: bool) -> Any:
        if vtype in _GGUF_SCALARS:
            return scalar(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            return string()
        if vtype == _GGUF_ARRAY:
            etype, n = scalar("I"), count()
            if etype in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[etype]
                data = _read(f, n * struct.calcsize(fmt))
                return list(struct.unpack(f"{endian}{n}{fmt}", data)) if keep else None
            return [value(etype, keep) for _ in range(n)]
        raise TokenizerError(f"unknown GGUF value type {vtype}")

    out: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        keep = key.startswith(prefix)
        v = value(scalar("I"), keep)
        if keep:
            out[key] = v
    return out


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"wanted {n} bytes, file ends after {len(data)}")
    return data


# --------------------------------------------------------------------------------------------
# Loading and streaming
# --------------------------------------------------------------------------------------------


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(4096).split()
    return len(first) == 2 and first[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0]) is not None


def load_tokenizer(path: str | Path, *, default_llama3: bool = False) -> Tokenizer:
    """The tokenizer of a checkpoint.

    `path`: a tokenizer.model (tiktoken), a tokenizer.json, a .gguf file, or a directory holding
    one of them or a converted GGUF checkpoint's gguf_tokenizer.json (looked for in that order;
    a GGUF directory uses its first *.gguf by name).
    A directory with none of them gives the `llama-models` Llama 3 tokenizer if `default_llama3`,
    else a TokenizerError naming the directory.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return HFTokenizer.from_gguf(path)
        if path.suffix == ".json":
            return HFTokenizer.from_file(path)
        return TiktokenTokenizer(path)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer path not found: {path}")
    model = path / "tokenizer.model"
    if model.is_file() and _is_tiktoken_file(model):
        return TiktokenTokenizer(model)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_file(path / "tokenizer.json")
    if (path / GGUF_TOKENIZER_FILE).is_file():
        return HFTokenizer.from_gguf_json(path / GGUF_TOKENIZER_FILE)
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return HFTokenizer.from_gguf(ggufs[0])
    if model.is_file():  # a SentencePiece model without a tokenizer.json
        return TiktokenTokenizer(model)  # raises a TokenizerError that says so
    if default_llama3:
        return llama3_tokenizer()
    raise TokenizerError(
        f"no tokenizer in {path}: expected tokenizer.model (tiktoken), tokenizer.json or a *.gguf file"
    )


class IncrementalDecoder:
    """Text of a token stream, piece by piece: `add` returns the text completed by one more token
    ('' while inside a multi-byte character), `flush` the rest. The pieces join up to exactly
    `tokenizer.decode(ids)` (without the special tokens if `skip_special`)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        # Python's incremental UTF-8 decoder emits whole characters only, and the same
        # replacement characters for invalid bytes as a one-shot decode.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = tokenizer.strips_leading_space

    def add(self, token_id: int) -> str:
        if self.skip_special and token_id in self.tokenizer.special_ids:
            return ""
        data = self.tokenizer.token_bytes(token_id)
        if self._at_start and data:
            self._at_start = False
            if data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
