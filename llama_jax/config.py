"""Model configuration: one dataclass, built from HF `config.json`, Meta `params.json`,
GGUF metadata or a named preset.

Every constructor validates at the border and raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration that cannot describe a Llama-architecture model."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 "llama3" rotary frequency scaling."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 131_072
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.head_dim == 0 and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ConfigError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        s = self.rope_scaling
        if s is not None:
            if s.factor < 1:
                raise ConfigError(f"rope_scaling.factor must be >= 1, got {s.factor}")
            if not 0 < s.low_freq_factor < s.high_freq_factor:
                raise ConfigError(
                    "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                    f"{s.low_freq_factor} and {s.high_freq_factor}"
                )
            if s.original_max_position_embeddings <= 0:
                raise ConfigError("rope_scaling.original_max_position_embeddings must be positive")

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + head + self.n_layers * per_layer + self.dim

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_value

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ---- serialisation (the config stored beside an Orbax checkpoint) ----
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config field(s): {sorted(unknown)}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LlamaConfig":
        return cls.from_dict(_read_json(Path(path)))

    # ---- constructors from the formats in the wild ----
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any] | str | Path) -> "LlamaConfig":
        """From a Hugging Face `config.json` (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        if not isinstance(cfg, Mapping):
            cfg = _read_json(Path(cfg))
        arch = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if arch != "llama" or any(a != "LlamaForCausalLM" for a in archs):
            raise ConfigError(
                f"model_type={arch!r}, architectures={archs!r}: only the Llama architecture "
                "(model_type 'llama', LlamaForCausalLM) is supported"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ConfigError(f"{flag}=true is not supported by the Llama 3 architecture")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
        dim = _req(cfg, "hidden_size")
        n_heads = _req(cfg, "num_attention_heads")
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10_000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=_req(cfg, "vocab_size"),
            dim=dim,
            n_layers=_req(cfg, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            ffn_dim=_req(cfg, "intermediate_size"),
            head_dim=cfg.get("head_dim") or dim // n_heads,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=_hf_rope_scaling(scaling),
            max_seq_len=int(cfg.get("max_position_embeddings", 131_072)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        )

    @classmethod
    def from_meta(cls, params: Mapping[str, Any] | str | Path, vocab_size: int | None = None) -> "LlamaConfig":
        """From Meta's `params.json`: the MLP width is derived from `ffn_dim_multiplier` and `multiple_of`."""
        if not isinstance(params, Mapping):
            params = _read_json(Path(params))
        if params.get("moe_args") or params.get("num_experts"):
            raise ConfigError("params.json describes a mixture-of-experts model; only dense Llama 3 is supported")
        dim = _req(params, "dim")
        n_heads = _req(params, "n_heads")
        vocab = params.get("vocab_size", vocab_size)
        if vocab is None or vocab <= 0:
            raise ConfigError("params.json has no positive vocab_size")
        multiple_of = params.get("multiple_of", 256)
        hidden = int(2 * (4 * dim) / 3)
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(params["ffn_dim_multiplier"] * hidden)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = RopeScaling(factor=float(params.get("rope_scaling_factor", 8.0)))
        return cls(
            vocab_size=vocab,
            dim=dim,
            n_layers=_req(params, "n_layers"),
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            ffn_dim=hidden,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 500_000.0)),
            rope_scaling=scaling,
            max_seq_len=int(params.get("max_seq_len", 131_072)),
            tie_embeddings=False,
            bos_token_id=128_000 if vocab == 128_256 else None,
            eos_token_ids=(128_001, 128_008, 128_009) if vocab == 128_256 else (),
        )

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any], has_output_tensor: bool) -> "LlamaConfig":
        """From GGUF metadata already read into plain Python values (see convert.gguf)."""
        arch = fields.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"general.architecture={arch!r}: only 'llama' GGUF files are supported")
        if fields.get("llama.expert_count"):
            raise ConfigError("llama.expert_count is set: mixture-of-experts GGUF files are not supported")

        def get(key: str, default: Any = None) -> Any:
            value = fields.get(f"llama.{key}", default)
            if value is None:
                raise ConfigError(f"GGUF metadata lacks llama.{key}")
            return value

        dim = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        vocab = fields.get("llama.vocab_size") or len(fields.get("tokenizer.ggml.tokens") or ())
        scaling = None
        kind = fields.get("llama.rope.scaling.type")
        if kind not in (None, "none", "llama3"):
            raise ConfigError(f"llama.rope.scaling.type={kind!r}: only 'llama3' rotary scaling is supported")
        if kind == "llama3" or (kind is None and fields.get("llama.rope.scaling.factor")):
            scaling = RopeScaling(
                factor=float(fields.get("llama.rope.scaling.factor", 8.0)),
                low_freq_factor=float(fields.get("llama.rope.scaling.low_freq_factor", 1.0)),
                high_freq_factor=float(fields.get("llama.rope.scaling.high_freq_factor", 4.0)),
                original_max_position_embeddings=int(fields.get("llama.rope.scaling.original_context_length", 8192)),
            )
        eos = fields.get("tokenizer.ggml.eos_token_id")
        eot = fields.get("tokenizer.ggml.eot_token_id")
        return cls(
            vocab_size=int(vocab),
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            ffn_dim=int(get("feed_forward_length")),
            head_dim=int(fields.get("llama.attention.key_length") or dim // n_heads),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10_000.0)),
            rope_scaling=scaling,
            max_seq_len=int(get("context_length", 131_072)),
            tie_embeddings=not has_output_tensor,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(t for t in (eos, eot) if t is not None)),
        )

    @classmethod
    def from_preset(cls, name: str) -> "LlamaConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def _req(d: Mapping[str, Any], key: str) -> Any:
    if d.get(key) is None:
        raise ConfigError(f"missing required field {key!r}")
    return d[key]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _hf_rope_scaling(s: Mapping[str, Any] | None) -> RopeScaling | None:
    if not s:
        return None
    kind = s.get("rope_type", s.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ConfigError(f"rope_scaling.rope_type={kind!r}: only 'llama3' scaling is supported")
    return RopeScaling(
        factor=float(_req(s, "factor")),
        low_freq_factor=float(s.get("low_freq_factor", 1.0)),
        high_freq_factor=float(s.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(s.get("original_max_position_embeddings", 8192)),
    )


_L3_EOS = (128_001, 128_008, 128_009)
_L31 = dict(vocab_size=128_256, rope_theta=500_000.0, rope_scaling=RopeScaling(), max_seq_len=131_072,
            bos_token_id=128_000, eos_token_ids=_L3_EOS)
_L32 = dict(_L31, rope_scaling=RopeScaling(factor=32.0))

PRESETS: dict[str, LlamaConfig] = {
    "llama3.1-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14_336, **_L31),
    "llama3.1-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28_672, **_L31),
    "llama3.1-405b": LlamaConfig(dim=16_384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53_248, **_L31),
    "llama3.2-1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True, **_L32),
    "llama3.2-3b": LlamaConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True, **_L32),
    # Tiny random-weight configs for tests and examples.
    "tiny": LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                        rope_scaling=RopeScaling(original_max_position_embeddings=64), max_seq_len=512),
    "tiny-mha-tied": LlamaConfig(vocab_size=384, dim=48, n_layers=3, n_heads=3, n_kv_heads=3, ffn_dim=96,
                                 rope_theta=10_000.0, tie_embeddings=True, max_seq_len=256),
    "tiny-8kv": LlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=16, n_kv_heads=8, ffn_dim=256,
                            rope_scaling=RopeScaling(original_max_position_embeddings=32), max_seq_len=256),
    "smollm2-135m": LlamaConfig(vocab_size=49_152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                                rope_theta=100_000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True,
                                bos_token_id=1, eos_token_ids=(2,)),
}
