"""Tokenizers against their references: Meta's llama-models tokenizer for Llama 3, transformers for
GGUF and tokenizer.json, the `tokenizers` library for SentencePiece-style decoding."""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_jax.tokenizer import (
    HFTokenizer,
    IncrementalDecoder,
    TiktokenTokenizer,
    TokenizerError,
    llama3_tokenizer,
    load_tokenizer,
    read_gguf_metadata,
)



@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


@pytest.fixture(scope="module")
def tok() -> TiktokenTokenizer:
    return llama3_tokenizer()


CORPUS = [
    "",
    "Hello, world! How are you doing today?",
    "Grüße aus München: Die Straße ist schön, oder? Äpfel, Öl, Übermut.",
    "Où est la bibliothèque ? C'est à côté de l'hôpital, n'est-ce pas ?",
    "Perché è così difficile? Già, però è bello.",
    "Olá! Você está bem? A ação e a coração; não sei.",
    "नमस्ते दुनिया, आप कैसे हैं? यह एक परीक्षण है।",
    "¿Dónde está el baño? ¡Qué día tan bonito! Mañana, señor.",
    "สวัสดีชาวโลก นี่คือการทดสอบภาษาไทย",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }\r\n",
    "emoji: 🎉🎉 👍🏽 🇫🇷 👨‍👩‍👧‍👦 ❤️",
    "tabs\t\tand   spaces    and\n\n\nnewlines \u00a0nbsp \u3000ideographic",
    " " * 500 + "x" + "\n" * 300 + "\t" * 40,
    "12345678901234567890 3.14159 1e-9 0x1F",
    "I'm, you're, he'll, they've, she'd, it's, WE'LL, I'M",
    "<|begin_of_text|><|eot_id|> looks special <|start_header_id|>user<|end_header_id|>",
    "<|reserved_special_token_42|><|python_tag|>brave_search.call(query=\"x\")<|eom_id|>",
    "中文字符测试，标点符号。日本語のテキスト。한국어 텍스트.",
    "русский текст, ελληνικά, עברית, العربية",
    "https://example.com/path?query=1&other=two#frag",
    "\u200b\u200c\u200d zero width \ufeff bom",
]


# --------------------------------------------------------------------------------------------
# Llama 3 (tiktoken) vs Meta
# --------------------------------------------------------------------------------------------


def test_llama3_vocabulary_matches_meta(tok, meta):
    assert tok.special_tokens == meta.special_tokens
    assert len(tok.special_tokens) == 256
    assert tok.vocab_size == meta.n_words == 128256
    assert (tok.bos_id, tok.eos_id) == (meta.bos_id, meta.eos_id) == (128000, 128001)
    assert tok.stop_ids == frozenset(meta.stop_tokens) == {128001, 128008, 128009}
    assert tok.token_id("<|eom_id|>") == meta.eom_id == 128008
    assert tok.token_id("<|python_tag|>") == meta.python_tag_id == 128010
    assert tok.chat_template is None


@pytest.mark.parametrize("text", CORPUS)
def test_llama3_encode_decode_match_meta(tok, meta, text):
    ids = tok.encode(text)
    assert ids == meta.encode(text, bos=False, eos=False)
    assert tok.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)
    assert tok.decode(ids) == meta.decode(ids) == text
    assert tok.encode(text, allow_special=True) == meta.encode(text, bos=False, eos=False, allowed_special="all")


def test_special_token_text_is_plain_unless_allowed(tok, meta):
    text = "a<|eot_id|>b"
    plain = tok.encode(text)
    assert 128009 not in plain and tok.decode(plain) == text
    assert tok.encode(text, allow_special=True) == [tok.encode("a")[0], 128009, tok.encode("b")[0]]
    assert plain == meta.encode(text, bos=False, eos=False)


def test_llama3_long_inputs_match_meta(tok, meta):
    rng = random.Random(3)
    words = " ".join(rng.choice(["alpha", "beta", "Grüße", "123", "🎉", "\n", "  "]) for _ in range(60_000))
    # Runs longer than tiktoken's 25k limit, one across the 400k boundary of Meta's chunks.
    text = words + " " * 60_000 + "\n" * 26_000 + "x" * 100_000 + words[:100_000]
    assert len(text) > 500_000 and text[400_000] == "x"
    ids = tok.encode(text)
    assert ids == meta.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_llama3_random_text_matches_meta(tok, meta, text):
    assert tok.encode(text) == meta.encode(text, bos=False, eos=False)


def test_token_id(tok):
    assert tok.token_id("<|begin_of_text|>") == 128000
    assert tok.token_id("hello") == tok.encode("hello")[0]
    assert tok.token_id(" hello") == tok.encode(" hello")[0]
    assert tok.token_id("hello world, this is not one token") is None


# --------------------------------------------------------------------------------------------
# Incremental decoding
# --------------------------------------------------------------------------------------------


def stream(tokenizer, ids, skip_special=False) -> list[str]:
    dec = IncrementalDecoder(tokenizer, skip_special=skip_special)
    return [dec.add(i) for i in ids] + [dec.flush()]


def check_pieces(tokenizer, ids, pieces, expected):
    assert "".join(pieces) == expected
    for piece in pieces:
        # A piece is whole characters: its UTF-8 is complete and has no replacement character
        # unless the full decode has one there too.
        piece.encode("utf-8")
        assert "\ufffd" not in piece or "\ufffd" in expected


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120))
def test_incremental_decode_of_text(tok, text):
    ids = tok.encode(text, allow_special=True)
    pieces = stream(tok, ids)
    check_pieces(tok, ids, pieces, tok.decode(ids))
    assert "".join(pieces) == text


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 128255), max_size=40))
def test_incremental_decode_of_any_ids(tok, ids):
    # Arbitrary ids split characters and form invalid UTF-8: the pieces still join to decode().
    check_pieces(tok, ids, stream(tok, ids), tok.decode(ids))
    plain = [i for i in ids if i not in tok.special_ids]
    assert "".join(stream(tok, ids, skip_special=True)) == tok.decode(plain)


def test_incremental_decode_holds_partial_characters(tok):
    ids = tok.encode("🎉")  # one emoji, several byte tokens
    assert len(ids) > 1
    dec = IncrementalDecoder(tok)
    pieces = [dec.add(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🎉"
    assert dec.flush() == ""
    dec = IncrementalDecoder(tok)
    dec.add(ids[0])
    assert dec.flush() == "\ufffd"  # an unfinished character at the end, as decode() shows it


# --------------------------------------------------------------------------------------------
# Loading and errors
# --------------------------------------------------------------------------------------------


def test_load_tokenizer_paths(tmp_path, tok):
    model = tmp_path / "ckpt" / "tokenizer.model"
    model.parent.mkdir()
    shutil.copy(llama3_tokenizer().path, model)
    for p in (model, model.parent):
        t = load_tokenizer(p)
        assert isinstance(t, TiktokenTokenizer) and t.encode("Grüße 🎉") == tok.encode("Grüße 🎉")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match=re.escape(str(empty))):
        load_tokenizer(empty)
    assert load_tokenizer(empty, default_llama3=True) is llama3_tokenizer()
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope")


def test_corrupt_files_are_named(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"SGVsbG8= 0\n\x00\x01 protobuf junk\n")
    with pytest.raises(TokenizerError, match=rf"{re.escape(str(bad))}: line 2"):
        load_tokenizer(bad)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"NOPE" + b"\x00" * 20)
    with pytest.raises(TokenizerError, match=rf"{re.escape(str(gguf))}.*bad magic"):
        load_tokenizer(gguf)
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + b"\x05" + b"\x00" * 7 + b"\x10")  # 5 keys, then EOF
    with pytest.raises(TokenizerError, match=rf"{re.escape(str(gguf))}: truncated"):
        load_tokenizer(gguf)
    js = tmp_path / "tokenizer.json"
    js.write_text("{not json")
    with pytest.raises(TokenizerError, match=re.escape(str(js))):
        load_tokenizer(js)


def test_missing_llama_models_is_explained(monkeypatch):
    import importlib.util

    from llama_jax import tokenizer as tk

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(TokenizerError, match="pip install llama-models"):
        tk._llama_models_tokenizer_path()


# --------------------------------------------------------------------------------------------
# GGUF (SmolLM2) vs transformers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smol_gguf) -> HFTokenizer:
    return load_tokenizer(smol_gguf)


@pytest.fixture(scope="module")
def smol_ref(smol_gguf):
    """transformers' tokenizer for the GGUF, built by the functions AutoTokenizer.from_pretrained
    (gguf_file=...) uses (faster than the whole from_pretrained), and a copy that reads
    special-token text as plain text (split_special_tokens)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, config = get_gguf_tokenizer(str(smol_gguf))
    backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    specials = {k: config[k] for k in ("bos_token", "eos_token") if config.get(k)}
    ref = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=config.get("chat_template"), **specials)
    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(backend.to_str()), split_special_tokens=True, **specials
    )
    return ref, plain


def gguf_corpus() -> list[str]:
    rng = random.Random(0)
    chars = list("aZé1 \n\t<|>{}\"'🎉中_") + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<jupyter_code>"]
    return CORPUS + ["".join(rng.choice(chars) for _ in range(rng.randint(0, 30))) for _ in range(150)]


def test_gguf_metadata_reader(tmp_path):
    """Every GGUF value type, written by the gguf package's writer, reads back."""
    import gguf
    import numpy as np

    values = {
        "general.architecture": "llama", "t.u8": (1, gguf.GGUFValueType.UINT8), "t.i8": (-2, gguf.GGUFValueType.INT8),
        "t.u16": (3, gguf.GGUFValueType.UINT16), "t.i16": (-4, gguf.GGUFValueType.INT16),
        "t.u32": (5, gguf.GGUFValueType.UINT32), "t.i32": (-6, gguf.GGUFValueType.INT32),
        "t.u64": (2**40, gguf.GGUFValueType.UINT64), "t.i64": (-(2**40), gguf.GGUFValueType.INT64),
        "t.f32": (0.5, gguf.GGUFValueType.FLOAT32), "t.f64": (0.25, gguf.GGUFValueType.FLOAT64),
        "t.bool": (True, gguf.GGUFValueType.BOOL), "t.str": ("Grüße 🎉", gguf.GGUFValueType.STRING),
        "t.strs": (["a", "", "中"], gguf.GGUFValueType.ARRAY), "t.ints": ([1, -2, 3], gguf.GGUFValueType.ARRAY),
    }
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for key, (value, vtype) in list(values.items())[1:]:
        w.add_key_value(key, value, vtype)
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = read_gguf_metadata(tmp_path / "m.gguf")
    assert got["general.architecture"] == "llama"
    for key, (value, _) in list(values.items())[1:]:
        assert got[key] == value, key
    strings = {"t.str": "Grüße 🎉", "t.strs": ["a", "", "中"]}
    assert read_gguf_metadata(tmp_path / "m.gguf", prefix="t.s") == strings


def test_gguf_tokenizer_matches_transformers(smol, smol_ref):
    from tokenizers import pre_tokenizers

    ref, plain = smol_ref
    assert smol.vocab_size == len(ref) == 49152
    assert (smol.bos_id, smol.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert smol.chat_template == ref.chat_template
    assert set(smol.special_tokens) == set(ref.all_special_tokens) | {
        t.content for t in ref.backend_tokenizer.get_added_tokens_decoder().values() if t.special
    }
    assert smol.stop_ids >= {ref.eos_token_id}
    # transformers builds the GGUF vocabulary with GPT-2's word split and ignores the file's
    # `tokenizer.ggml.pre` = "smollm", which (in llama.cpp and in SmolLM2's own tokenizer.json)
    # first isolates every digit. With that pre-tokenizer restored, ids must be equal everywhere.
    smollm_split = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    differs = []
    for text in gguf_corpus():
        ids, ids_plain = smol.encode(text, allow_special=True), smol.encode(text)
        assert smol.decode(ids) == ref.decode(ids) == text
        ref_ids, ref_plain = ref.encode(text, add_special_tokens=False), plain.encode(text, add_special_tokens=False)
        if ids != ref_ids or ids_plain != ref_plain:
            differs.append(text)
    # The unpatched split differs only where 2+ whitespace characters precede a digit.
    assert all(re.search(r"\s\s\d", t) for t in differs), differs
    for r in (ref, plain):
        r.backend_tokenizer.pre_tokenizer = smollm_split
    for text in gguf_corpus():
        assert smol.encode(text, allow_special=True) == ref.encode(text, add_special_tokens=False), text
        assert smol.encode(text) == plain.encode(text, add_special_tokens=False), text


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_gguf_incremental_decode(smol, text):
    ids = smol.encode(text, allow_special=True)
    # (no round trip to `text`: the vocabulary lacks a few byte tokens, e.g. 0xF1)
    assert "".join(stream(smol, ids)) == smol.decode(ids)


def test_tokenizer_json_round_trip(tmp_path, smol):
    """A tokenizer.json directory (saved from the GGUF tokenizer) loads with its config, and
    agrees with transformers' PreTrainedTokenizerFast reading the same files."""
    from transformers import AutoTokenizer

    smol._tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": "{{ 'x' }}",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    t = load_tokenizer(tmp_path)
    assert isinstance(t, HFTokenizer)
    assert (t.bos_id, t.eos_id, t.chat_template) == (1, 2, "{{ 'x' }}")
    assert t.stop_ids == {0, 2}
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in CORPUS:
        assert t.encode(text, allow_special=True) == ref.encode(text, add_special_tokens=False) == smol.encode(
            text, allow_special=True
        )


def test_sentencepiece_style_tokenizer_json(tmp_path):
    """▁-for-space BPE with byte fallback (Llama 2 / Mistral style): decode and streamed decode
    agree with the `tokenizers` library's own decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def spm_style(model):
        t = Tokenizer(model)
        t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        t.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        t.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        return t

    base = spm_style(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    base.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})  # byte-fallback pieces, as Llama 2 has
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    sp = spm_style(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    sp.add_special_tokens(["<unk>", "<s>", "</s>"])
    sp.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path)
    assert t.strips_leading_space and t.bos_id == sp.token_to_id("<s>") and t.eos_id == sp.token_to_id("</s>")
    for text in ["hello world", " leading space", "Grüße 🎉 unknown chars", "fox  jumps", "<s>raw"]:
        ids = t.encode(text, allow_special=True)
        assert ids == sp.encode(text, add_special_tokens=False).ids
        assert t.decode(ids) == sp.decode(ids, skip_special_tokens=False)
        assert "".join(stream(t, ids)) == t.decode(ids)
        assert "".join(stream(t, [1, *ids], skip_special=True)) == sp.decode([1, *ids], skip_special_tokens=True)
