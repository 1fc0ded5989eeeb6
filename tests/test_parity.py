"""Logit parity of converted checkpoints with the reference implementations, in float32 on CPU:
transformers' LlamaForCausalLM (HF and GGUF sources) and Meta's llama_models Transformer (Meta
sources, model-parallel shards merged by the converter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import convert
from llama_jax.checkpoint import read_config, restore_params
from llama_jax.config import LlamaConfig
from llama_jax.model import KVCache, forward

torch = pytest.importorskip("torch")

_JITTED: dict[LlamaConfig, Any] = {}


def _forward_fn(config: LlamaConfig) -> Any:
    """One jitted forward per config: (params, tokens (B, T), positions (B, T), cache) -> (logits, cache)."""
    if config not in _JITTED:
        _JITTED[config] = jax.jit(lambda params, tokens, positions, cache: forward(
            params, config, tokens, positions, cache))
    return _JITTED[config]


def our_logits(ckpt: Path, tokens: np.ndarray) -> np.ndarray:
    """Full-sequence float32 logits (B, T, V) of a converted checkpoint."""
    config = read_config(ckpt)
    params = restore_params(ckpt, dtype="float32", progress=False)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = _forward_fn(config)(params, jnp.asarray(tokens, jnp.int32), positions,
                                    KVCache.zeros(config, b, t, jnp.float32))
    return np.asarray(logits)


def assert_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    err = float(np.max(np.abs(ours - ref)))
    scale = float(np.max(np.abs(ref)))
    assert err <= rel * scale, f"max |ours - ref| = {err:.3g} exceeds {rel:g} * max|ref| = {rel * scale:.3g}"


def _tokens(vocab: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=np.int64)


def hf_logits(model: Any, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


# ------------------------------------------------------------------ Hugging Face


@pytest.mark.parametrize(
    "case",
    [
        dict(kv_heads=2, tie=False, llama3_scaling=True),  # GQA, llama3 scaling, untied
        dict(kv_heads=4, tie=True, llama3_scaling=False, theta=10_000.0),  # MHA, tied, plain RoPE
        dict(kv_heads=1, tie=False, llama3_scaling=True, shard="40KB"),  # MQA, sharded safetensors + index
    ],
    ids=["gqa-llama3-untied", "mha-tied", "mqa-sharded"],
)
def test_hf_logits_match_transformers(case: dict, ckpt_builders: Any, tmp_path: Path) -> None:
    case = dict(case)
    shard = case.pop("shard", None)
    model = ckpt_builders.hf_tiny_model(seed=1, **case)
    src = ckpt_builders.hf_save(model, tmp_path / "hf", max_shard_size=shard)
    if shard:
        assert (src / "model.safetensors.index.json").exists()
    ckpt = convert("hf", src, tmp_path / "ckpt", dtype="float32", progress=False)
    tokens = _tokens(model.config.vocab_size, (2, 24), seed=2)
    assert_close(our_logits(ckpt, tokens), hf_logits(model, tokens))


# ------------------------------------------------------------------ Meta


def meta_reference_logits(params: dict, state: dict, tokens: np.ndarray) -> np.ndarray:
    """Meta's reference Transformer (model-parallel size 1) on the full, unsplit weights."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    b, t = tokens.shape
    torch.set_default_dtype(torch.float32)
    model = Transformer(ModelArgs(**params, max_batch_size=b, max_seq_len=t))
    model.load_state_dict(state, strict=True)
    return model(torch.as_tensor(tokens), 0).float().numpy()


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_logits_match_reference(
    n_shards: int, ckpt_builders: Any, meta_model_parallel: None, tmp_path: Path
) -> None:
    params = ckpt_builders.meta_params()
    state = ckpt_builders.meta_random_state(params, seed=3)
    src = ckpt_builders.meta_write(tmp_path / "meta", params, state, n_shards)
    ckpt = convert("meta", src, tmp_path / "ckpt", dtype="float32", progress=False)
    tokens = _tokens(params["vocab_size"], (2, 20), seed=4)
    assert_close(our_logits(ckpt, tokens), meta_reference_logits(params, state, tokens))


def test_meta_and_hf_paths_agree(ckpt_builders: Any, tmp_path: Path) -> None:
    """The same weights as a 2-shard Meta checkpoint and as an HF directory give the same logits."""
    params = ckpt_builders.meta_params()
    state = ckpt_builders.meta_random_state(params, seed=5)
    meta_ckpt = convert("meta", ckpt_builders.meta_write(tmp_path / "meta", params, state, 2), tmp_path / "a",
                        dtype="float32", progress=False)
    config = read_config(meta_ckpt)
    hf_src = ckpt_builders.hf_write_state(tmp_path / "hf", ckpt_builders.meta_to_hf_state(state, params),
                                          ckpt_builders.hf_config_dict(config))
    hf_ckpt = convert("hf", hf_src, tmp_path / "b", dtype="float32", progress=False)
    assert read_config(hf_ckpt) == config
    tokens = _tokens(params["vocab_size"], (1, 16), seed=6)
    np.testing.assert_allclose(our_logits(meta_ckpt, tokens), our_logits(hf_ckpt, tokens), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ real weights: SmolLM2 GGUF

SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY_TOKENS = 32


def _right_padded(seqs: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(seqs), length), np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


@pytest.mark.slow
def test_smollm2_gguf_logits_and_greedy_match_transformers(smol_checkpoint: Path, smol_reference: tuple) -> None:
    tok, model = smol_reference
    prompts = [tok(p).input_ids for p in SMOL_PROMPTS]
    lengths = [len(p) for p in prompts]
    config = read_config(smol_checkpoint)
    params = restore_params(smol_checkpoint, dtype="float32", progress=False)
    step = _forward_fn(config)

    # Prefill all prompts at once, right-padded: causal attention keeps padding out of valid positions.
    b, t = len(prompts), max(lengths)
    cache = KVCache.zeros(config, b, t + GREEDY_TOKENS, jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = step(params, jnp.asarray(_right_padded(prompts, t), jnp.int32), positions, cache)
    logits = np.asarray(logits)
    for i, p in enumerate(prompts):
        ref = hf_logits(model, np.asarray([p]))[0]
        assert_close(logits[i, : len(p)], ref)

    # Greedy decoding with our KV cache, row i continuing at its own position.
    ours = [[int(np.argmax(logits[i, n - 1]))] for i, n in enumerate(lengths)]
    for k in range(1, GREEDY_TOKENS):
        tokens = jnp.asarray([[o[-1]] for o in ours], jnp.int32)
        positions = jnp.asarray([[n + k - 1] for n in lengths], jnp.int32)
        logits, cache = step(params, tokens, positions, cache)
        for i, row in enumerate(np.asarray(logits)[:, 0]):
            ours[i].append(int(np.argmax(row)))

    for i, p in enumerate(prompts):
        ref, past, x = [], None, torch.as_tensor([p])
        with torch.no_grad():
            for _ in range(GREEDY_TOKENS):
                out = model(x, past_key_values=past, use_cache=True)
                past = out.past_key_values
                ref.append(int(out.logits[0, -1].argmax()))
                x = torch.as_tensor([[ref[-1]]])
        assert ours[i] == ref, f"prompt {i}: greedy continuations differ:\n{tok.decode(ours[i])!r}\n{tok.decode(ref)!r}"
