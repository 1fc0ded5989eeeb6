import json

import pytest

from llama_jax.config import ConfigError, LlamaConfig, RopeScaling

META_PARAMS = {
    "8b": ({"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
            "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
            "vocab_size": 128256}, "llama3.1-8b"),
    "70b": ({"dim": 8192, "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "n_heads": 64, "n_kv_heads": 8,
             "n_layers": 80, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
             "vocab_size": 128256}, "llama3.1-70b"),
    "405b": ({"dim": 16384, "ffn_dim_multiplier": 1.2, "multiple_of": 4096, "n_heads": 128, "n_kv_heads": 8,
              "n_layers": 126, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
              "vocab_size": 128256}, "llama3.1-405b"),
}

HF_8B_V4 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "vocab_size": 128256, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


@pytest.mark.parametrize("size", sorted(META_PARAMS))
def test_meta_params_derive_the_preset(size):
    params, preset = META_PARAMS[size]
    assert LlamaConfig.from_meta(params) == LlamaConfig.from_preset(preset)


def test_hf_config_v4_and_v5_agree_with_preset():
    v4 = LlamaConfig.from_hf(HF_8B_V4)
    v5_dict = {k: v for k, v in HF_8B_V4.items() if k not in ("rope_theta", "rope_scaling")}
    v5_dict["rope_parameters"] = dict(HF_8B_V4["rope_scaling"], rope_theta=500000.0)
    v5 = LlamaConfig.from_hf(v5_dict)
    assert v4 == v5 == LlamaConfig.from_preset("llama3.1-8b")


def test_hf_config_from_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF_8B_V4))
    assert LlamaConfig.from_hf(path).n_layers == 32


def test_known_sizes():
    assert round(LlamaConfig.from_preset("llama3.1-8b").num_params() / 1e9, 2) == 8.03
    assert round(LlamaConfig.from_preset("llama3.1-70b").num_params() / 1e9, 1) == 70.6
    assert round(LlamaConfig.from_preset("llama3.1-405b").num_params() / 1e9) == 406
    assert LlamaConfig.from_preset("llama3.1-8b").kv_bytes_per_token() == 128 * 1024
    assert LlamaConfig.from_preset("llama3.2-1b").rope_scaling.factor == 32.0


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2", "gemma"])
def test_other_architectures_are_refused(model_type):
    with pytest.raises(ConfigError, match="model_type"):
        LlamaConfig.from_hf(dict(HF_8B_V4, model_type=model_type))


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_key_value_heads": 5}, "n_kv_heads"),
        ({"hidden_size": -1}, "dim"),
        ({"rope_scaling": dict(HF_8B_V4["rope_scaling"], rope_type="yarn")}, "rope_type"),
        ({"rope_scaling": dict(HF_8B_V4["rope_scaling"], low_freq_factor=5.0)}, "low_freq_factor"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_inconsistent_fields_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.from_hf(dict(HF_8B_V4, **change))


def test_missing_field_is_named():
    cfg = dict(HF_8B_V4)
    del cfg["num_hidden_layers"]
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        LlamaConfig.from_hf(cfg)


def test_gguf_metadata():
    fields = {
        "general.architecture": "llama", "llama.embedding_length": 576, "llama.block_count": 30,
        "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3, "llama.feed_forward_length": 1536,
        "llama.rope.freq_base": 100000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.context_length": 8192, "llama.vocab_size": 49152, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    assert LlamaConfig.from_gguf(fields, has_output_tensor=False) == LlamaConfig.from_preset("smollm2-135m")
    with pytest.raises(ConfigError, match="general.architecture"):
        LlamaConfig.from_gguf(dict(fields, **{"general.architecture": "qwen2"}), has_output_tensor=False)


def test_roundtrip_through_json(tmp_path):
    cfg = LlamaConfig.from_preset("llama3.1-70b")
    cfg.save(tmp_path / "c.json")
    assert LlamaConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ConfigError, match="unknown"):
        LlamaConfig.from_dict(dict(cfg.to_dict(), n_experts=8))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="llama3.1-8b"):
        LlamaConfig.from_preset("llama9")


def test_scaling_validation():
    with pytest.raises(ConfigError, match="factor"):
        LlamaConfig.from_preset("tiny").replace(rope_scaling=RopeScaling(factor=0.5))
