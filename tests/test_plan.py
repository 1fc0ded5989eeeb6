"""The memory planner against the known sizes of Llama 3.1, and its compiled figures on a
simulated 8-device mesh (scripts/plan.py in a subprocess; nothing is allocated)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax.config import LlamaConfig
from llama_jax.planner import parse_bytes, plan

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


@pytest.mark.parametrize(
    "model, weights, kv_per_1k_tokens",
    [
        # bf16 weights (8B is 8.03e9 parameters) and KV cache per 1,024 tokens:
        # 2 (K, V) x layers x 8 KV heads x 128 x 2 bytes = 128 / 320 / 504 KiB per token.
        ("llama3.1-8b", 16.06e9, 0.125 * GIB),
        ("llama3.1-70b", 141.1e9, 0.3125 * GIB),
        ("llama3.1-405b", 811.7e9, 0.4922 * GIB),
    ],
)
def test_known_sizes_on_one_device(model: str, weights: float, kv_per_1k_tokens: float) -> None:
    p = plan(LlamaConfig.from_preset(model), "tp=1", max_seq_len=1024, batch=1, compile=False, name=model)
    assert p.weights == pytest.approx(weights, rel=1e-3)
    assert p.kv_cache == pytest.approx(kv_per_1k_tokens, rel=1e-3)


def test_8bit_weights_and_cache() -> None:
    """fp8 layer weights: one byte per weight plus a float32 scale per output channel; embeddings
    and LM head stay bf16. int8 cache: one byte per value plus a float32 scale per token and head."""
    config = LlamaConfig.from_preset("llama3.1-405b")
    p = plan(config, "tp=1", quantize="fp8", cache_dtype="int8", max_seq_len=1024, compile=False)
    embeddings = 2 * config.vocab_size * config.dim * 2
    assert p.weights == pytest.approx(embeddings + (config.num_params() - embeddings / 2), rel=2e-3)
    assert p.kv_cache == 1024 * 2 * config.n_layers * config.n_kv_heads * (config.head_dim + 4)


def test_quantized_lm_head() -> None:
    """The untied LM head in int8: one byte per weight plus a float32 scale per vocabulary entry,
    split over tp like the bf16 head; a tied head has nothing separate to quantize."""
    config = LlamaConfig.from_preset("llama3.1-8b")
    layers_only = plan(config, "tp=1", quantize="int8", max_seq_len=1024, compile=False)
    both = plan(config, "tp=1", quantize="int8", quantize_lm_head=True, max_seq_len=1024, compile=False)
    head = config.dim * config.vocab_size
    assert layers_only.weights - both.weights == 2 * head - (head + 4 * config.vocab_size)
    assert "int8 layer weights and LM head" in both.report()
    with pytest.raises(ValueError, match="needs quantize"):
        plan(config, "tp=1", quantize_lm_head=True, compile=False)
    with pytest.raises(ValueError, match="tied"):
        plan(LlamaConfig.from_preset("llama3.2-1b"), "tp=1", quantize="int8", quantize_lm_head=True, compile=False)


def test_parse_bytes() -> None:
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("1.5e9") == 1_500_000_000
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes("80 parsecs")


def _plan_cli(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "plan.py"), *args, "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bytes per device" in proc.stdout
    return json.loads(out.read_text())


def test_8b_on_tp8_compiled(tmp_path: Path) -> None:
    p = _plan_cli(tmp_path, "--model", "llama3.1-8b", "--mesh", "tp=8", "--max-seq", "8192", "--batch", "4",
                  "--device-memory", "80GB")
    config = LlamaConfig.from_preset("llama3.1-8b")
    norms = (2 * config.n_layers + 1) * config.dim * 2  # replicated on every device
    assert p["weights"] == pytest.approx((16.06e9 - norms) / 8 + norms, rel=1e-3)
    kv = 4 * 8192 * config.kv_bytes_per_token() // 8
    assert p["kv_cache"] == kv
    # The compiler sees exactly the weights, the cache and two (4,) int32 token/position vectors,
    # and writes the cache in place (the output aliases the donated input).
    assert p["compiled_arguments"] == p["weights"] + kv + 2 * 4 * 4
    assert p["compiled_aliased"] == kv
    assert p["compiled_temp"] > 0 and p["fits"] is True
    assert p["gpu_temp_decode"] < p["compiled_temp"]  # the CPU figure overstates (f32 upcasts)


def test_kv_heads_replicated_only_as_needed(tmp_path: Path) -> None:
    """tp=16 > 8 KV heads: each device keeps one KV head (an eighth of the cache), not all eight."""
    p = _plan_cli(tmp_path, "--model", "llama3.1-8b", "--mesh", "tp=16", "--max-seq", "4096", "--no-compile")
    assert p["kv_cache"] == 4096 * LlamaConfig.from_preset("llama3.1-8b").kv_bytes_per_token() // 8
    assert p["compiled_arguments"] is None and p["fits"] is True
