"""llama-jax: Llama 3.1 inference in JAX/XLA.

`load`, `LLM`, `Completion` and `ChatResponse` are imported on first use, so that tools which only
need the model or the checkpoint format (the converter) do not load the tokenizers and engine.
"""

from typing import Any

from .config import ConfigError, LlamaConfig, RopeScaling
from .model import KVCache, Llama, forward
from .sampling import SamplingParams
from .speculative import NgramSpeculation
from .structured import StructuredOutput

_API = ("LLM", "ChatResponse", "Completion", "load")

__all__ = ["ConfigError", "KVCache", "Llama", "LlamaConfig", "NgramSpeculation", "RopeScaling", "SamplingParams",
           "StructuredOutput", "forward", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")
