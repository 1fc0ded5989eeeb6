"""Meta (llama-models) checkpoints: `consolidated.NN.pth` model-parallel shards + `params.json`.

Shards are merged along the axis that Meta's fairscale layers split: ColumnParallelLinear
(wq, wk, wv, w1, w3, output) on the output features (dim 0 of the torch weight),
RowParallelLinear (wo, w2) on the input features (dim 1), VocabParallelEmbedding
(tok_embeddings in Llama 3) on the vocabulary (dim 0; Llama 2's ParallelEmbedding split dim 1,
which is recognised from the shard shapes). Norms are replicated. wq and wk are in the
interleaved rotary layout and are reordered to half-split.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from convert._common import (
    ConvertError,
    source_global_shapes,
    source_layer_shapes,
    torch_to_numpy,
    write_checkpoint,
)
from llama_jax.config import ConfigError, LlamaConfig

COPIED_FILES = ("params.json", "tokenizer.model")
_GLOBAL_NAMES = {"embed": "tok_embeddings.weight", "norm": "norm.weight", "lm_head": "output.weight"}
_LAYER_NAMES = {
    "attn_norm": "attention_norm.weight",
    "q": "attention.wq.weight",
    "k": "attention.wk.weight",
    "v": "attention.wv.weight",
    "o": "attention.wo.weight",
    "mlp_norm": "ffn_norm.weight",
    "gate": "feed_forward.w1.weight",
    "up": "feed_forward.w3.weight",
    "down": "feed_forward.w2.weight",
}
# role -> model-parallel split axis of the torch weight (None: replicated).
_SPLIT_AXIS = {"norm": None, "lm_head": 0, "attn_norm": None, "mlp_norm": None,
               "q": 0, "k": 0, "v": 0, "gate": 0, "up": 0, "o": 1, "down": 1}
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")


class MetaSource:
    kind = "meta"
    interleaved = True

    def __init__(self, src: str | os.PathLike) -> None:
        self.dir = Path(src)
        if not self.dir.is_dir():
            raise ConvertError(f"{self.dir}: not a directory (expected a Meta checkpoint directory)")
        params_file = self.dir / "params.json"
        try:
            params = json.loads(params_file.read_text())
        except FileNotFoundError:
            raise ConvertError(f"{params_file}: missing") from None
        except (OSError, ValueError) as e:
            raise ConvertError(f"{params_file}: not valid JSON ({e})") from None
        if not isinstance(params, dict) or not isinstance(params.get("dim"), int):
            raise ConvertError(f"{params_file}: missing required field 'dim'")
        self.shard_files = self._find_shards()
        shards = self._load_shards()
        self._embed_axis, vocab = self._embedding_layout(shards, params)
        try:
            self.config = LlamaConfig.from_meta(params, vocab_size=vocab)
        except ConfigError as e:
            raise ConvertError(f"{params_file}: {e}") from None
        self._check_inventory(shards)

    def _find_shards(self) -> list[Path]:
        found = {}
        for p in self.dir.glob("consolidated.*.pth"):
            if m := _SHARD_RE.fullmatch(p.name):
                found[int(m.group(1))] = p
        if not found:
            raise ConvertError(f"{self.dir}: no consolidated.NN.pth files")
        n = len(found)
        if sorted(found) != list(range(n)):
            gap = min(set(range(max(found) + 1)) - set(found))
            raise ConvertError(f"{self.dir}: model-parallel shard consolidated.{gap:02d}.pth is missing")
        return [found[i] for i in range(n)]

    def _load_shards(self) -> list[dict[str, Any]]:
        """Memory-mapped: tensors are paged in only when touched. Reloaded per layer so that the
        pages of finished layers are unmapped again."""
        import torch

        shards = []
        for file in self.shard_files:
            try:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # truncated zip, not a torch file, unpickling refused
                raise ConvertError(f"{file}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
            if not isinstance(state, dict):
                raise ConvertError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
            shards.append(state)
        return shards

    def _shard_tensors(self, shards: list[dict[str, Any]], name: str) -> list[Any]:
        out = []
        for file, state in zip(self.shard_files, shards):
            if name not in state:
                raise ConvertError(f"{file}: tensor {name} is missing")
            out.append(state[name])
        return out

    def _embedding_layout(self, shards: list[dict[str, Any]], params: dict[str, Any]) -> tuple[int, int]:
        parts = self._shard_tensors(shards, _GLOBAL_NAMES["embed"])
        dim = params.get("dim")
        shapes = [tuple(p.shape) for p in parts]
        if any(len(s) != 2 for s in shapes):
            raise ConvertError(f"{self.shard_files[0]}: tensor tok_embeddings.weight is not 2-D: {shapes[0]}")
        if all(s[1] == dim for s in shapes):
            return 0, sum(s[0] for s in shapes)  # VocabParallelEmbedding
        if len({s[0] for s in shapes}) == 1 and sum(s[1] for s in shapes) == dim:
            return 1, shapes[0][0]  # ParallelEmbedding (Llama 2)
        raise ConvertError(
            f"{self.shard_files[0]}: tok_embeddings.weight shard shapes {shapes} do not fit dim={dim} from params.json"
        )

    def _axis(self, role: str) -> int | None:
        return self._embed_axis if role == "embed" else _SPLIT_AXIS[role]

    def _names(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(role, Meta tensor name, expected merged shape) for every tensor we read."""
        out = [(role, _GLOBAL_NAMES[role], shape) for role, shape in source_global_shapes(self.config).items()]
        for i in range(self.config.n_layers):
            for role, shape in source_layer_shapes(self.config).items():
                out.append((role, f"layers.{i}.{_LAYER_NAMES[role]}", shape))
        return out

    def _check_inventory(self, shards: list[dict[str, Any]]) -> None:
        n = len(shards)
        for role, name, shape in self._names():
            axis = self._axis(role)
            for file, t in zip(self.shard_files, self._shard_tensors(shards, name)):
                want = list(shape)
                if axis is not None:
                    if shape[axis] % n:
                        raise ConvertError(f"{file}: tensor {name} of merged shape {shape} cannot be split "
                                           f"{n} ways along axis {axis}")
                    want[axis] //= n
                if tuple(t.shape) != tuple(want):
                    raise ConvertError(f"{file}: tensor {name} has shape {tuple(t.shape)}, but the config and "
                                       f"{n} model-parallel shard(s) imply {tuple(want)}")

    def _read(self, names: dict[str, str]) -> dict[str, np.ndarray]:
        shards = self._load_shards()
        out = {}
        for role, name in names.items():
            parts = [torch_to_numpy(t) for t in self._shard_tensors(shards, name)]
            axis = self._axis(role)
            out[role] = parts[0] if axis is None or len(parts) == 1 else np.concatenate(parts, axis=axis)
        return out

    def read_global(self, role: str) -> np.ndarray:
        return self._read({role: _GLOBAL_NAMES[role]})[role]

    def read_layer(self, i: int) -> dict[str, np.ndarray]:
        return self._read({role: f"layers.{i}.{name}" for role, name in _LAYER_NAMES.items()})

    def files_to_copy(self) -> list[Path]:
        return [self.dir / name for name in COPIED_FILES if (self.dir / name).is_file()]

    def json_files(self) -> dict[str, Any]:
        return {}


def convert_meta(
    src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = "bfloat16", overwrite: bool = False,
    progress: bool = True, quantize: str | None = None,
) -> Path:
    """Converts a Meta `consolidated.NN.pth` checkpoint directory into a llama-jax checkpoint at `dst`."""
    return write_checkpoint(MetaSource(src), dst, dtype, overwrite, progress, quantize)
