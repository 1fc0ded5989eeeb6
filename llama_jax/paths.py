"""Where llama-jax keeps what it downloads, converts and compiles."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """`$LLAMA_JAX_CACHE`, else the user cache directory (~/.cache/llama-jax on Linux)."""
    root = os.environ.get("LLAMA_JAX_CACHE")
    path = Path(root) if root else Path(platformdirs.user_cache_dir("llama-jax"))
    path.mkdir(parents=True, exist_ok=True)
    return path
