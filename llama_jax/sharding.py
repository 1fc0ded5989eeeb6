"""Device meshes and the one table that maps logical axes to mesh axes.

A mesh spec names two axes: `dp` (data parallel: the batch of decode slots) and `tp` (tensor
parallel: attention heads, MLP width and vocabulary). `make_mesh("dp=2,tp=4")` builds it;
`ModelShardings(config, mesh)` gives every weight and the KV cache a `NamedSharding`.

KV heads when `tp` exceeds them. Llama 3 has 8 KV heads; at tp=16 (or a tiny test model with 2
KV heads at tp=8) they cannot be split one group per device. Sharding `head_dim` instead would
split each dot product of attention across devices (an all-reduce of the scores every layer)
and cut the rotary pairs (j, j + Dh/2) apart. So KV heads are replicated, but only as much as
needed: `ModelShardings` splits `tp` into `tp_kv` (gcd(tp, kv_heads), over which KV heads are
sharded) times `tp_rep` (the replicas of each KV head). Query heads, MLP and vocabulary are
sharded over both, `tp_kv` major, so the query heads on a device always belong to the KV heads
it holds: attention needs no communication, and each device stores kv_heads / tp_kv KV heads
instead of all of them (8x less cache than full replication for Llama 3 at tp=16).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import LlamaConfig
from .model import CACHE_AXES, LOGICAL_AXES, KVCache, param_shapes

MESH_AXES = ("dp", "tp")  # the user-facing mesh, outer to inner: tp varies fastest (same host)
MODEL_MESH_AXES = ("dp", "tp_kv", "tp_rep")  # tp split as described in the module docstring

# The one table: logical axis -> mesh axes of the model mesh (major to minor). An axis mapped to (),
# or whose size the mesh axes do not divide, is replicated (see `ModelShardings.spec`).
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("dp",),
    "vocab": ("tp_kv", "tp_rep"),
    "q_heads": ("tp_kv", "tp_rep"),
    "mlp": ("tp_kv", "tp_rep"),
    "kv_heads": ("tp_kv",),
    "embed": (),
    "head_dim": (),
    "norm": (),
    "layers": (),
    "seq": (),
}


class MeshError(ValueError):
    """A mesh spec that cannot be built on the available devices."""


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """"dp=2,tp=4" -> {"dp": 2, "tp": 4}; a missing axis has size 1."""
    if isinstance(spec, str):
        items: dict[str, int] = {}
        for part in (p.strip() for p in spec.split(",")):
            m = re.fullmatch(r"([A-Za-z_]\w*)\s*=\s*(-?\d+)", part)
            if not m:
                raise MeshError(f"mesh spec {spec!r}: {part!r} is not of the form axis=size (e.g. 'dp=2,tp=4')")
            if m[1] in items:
                raise MeshError(f"mesh spec {spec!r}: axis {m[1]!r} is given twice")
            items[m[1]] = int(m[2])
    else:
        items = dict(spec)
    unknown = [a for a in items if a not in MESH_AXES]
    if unknown:
        raise MeshError(f"mesh spec {spec!r}: unknown axis {unknown[0]!r}; the axes are {', '.join(MESH_AXES)}")
    for axis, size in items.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise MeshError(f"mesh spec {spec!r}: axis {axis} must have a positive integer size, got {size!r}")
    return {a: int(items.get(a, 1)) for a in MESH_AXES}


def make_mesh(
    spec: str | Mapping[str, int], devices: Sequence[Any] | None = None, *, allow_subset: bool = False
) -> Mesh:
    """A ("dp", "tp") mesh over `devices` (default: all devices of all processes).

    The product of the sizes must equal the device count, unless `allow_subset`, which takes
    the first dp*tp devices. tp is the inner axis, so a tp group is consecutive devices: one host.
    """
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(sizes.values())
    if need > len(devices) or (need < len(devices) and not allow_subset):
        raise MeshError(
            f"mesh spec {spec!r} needs {need} devices but {len(devices)} are available"
            + ("" if need > len(devices) else " (pass allow_subset=True to use only the first ones)")
        )
    grid = np.array(devices[:need], dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


def model_mesh(mesh: Mesh, n_kv_heads: int) -> Mesh:
    """The same devices as `mesh` with tp split into (tp_kv, tp_rep), tp_kv = gcd(tp, n_kv_heads)."""
    if mesh.axis_names == MODEL_MESH_AXES and n_kv_heads % mesh.shape["tp_kv"] == 0:
        return mesh  # already split (the `mesh` of another ModelShardings)
    missing = [a for a in MESH_AXES if a not in mesh.shape]
    extra = [a for a in mesh.axis_names if a not in MESH_AXES]
    if missing or extra:
        raise MeshError(f"the mesh has axes {mesh.axis_names}; expected {MESH_AXES} (build it with make_mesh)")
    dp, tp = mesh.shape["dp"], mesh.shape["tp"]
    tp_kv = math.gcd(tp, n_kv_heads)
    grid = mesh.devices.transpose([mesh.axis_names.index(a) for a in MESH_AXES])
    return Mesh(grid.reshape(dp, tp_kv, tp // tp_kv), MODEL_MESH_AXES)


@dataclasses.dataclass(init=False)
class ModelShardings:
    """Named shardings of the parameters (`params`, same tree as `param_shapes`) and the KV cache
    (`cache`, a KVCache of shardings) of `config` on `mesh`, from the table `RULES`."""

    config: LlamaConfig
    mesh: Mesh  # the model mesh ("dp", "tp_kv", "tp_rep")
    params: dict[str, Any]
    cache: KVCache

    def __init__(self, config: LlamaConfig, mesh: Mesh | str):
        self.config = config
        self.mesh = model_mesh(make_mesh(mesh) if isinstance(mesh, str) else mesh, config.n_kv_heads)
        shapes = param_shapes(config)
        self.params = {k: self._param(k, s) for k, s in shapes.items() if k != "layers"}
        self.params["layers"] = {k: self._param(k, s) for k, s in shapes["layers"].items()}
        # Shape-free: the cache's batch (slots) must be a multiple of dp; Engine checks it.
        cache_shape = (config.n_layers, self.dp, 1, config.n_kv_heads, config.head_dim)
        cache = self.sharding(CACHE_AXES, cache_shape)
        self.cache = KVCache(cache, cache)

    @property
    def dp(self) -> int:
        return self.mesh.shape["dp"]

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def cache_for(self, dtype: Any) -> KVCache:
        """Shardings of a KV cache of `dtype`: `cache`, plus the scales (L, B, S, K) of an int8 cache."""
        if np.dtype(dtype) != np.int8:
            return self.cache
        c = self.config
        scale = self.sharding(CACHE_AXES[:-1], (c.n_layers, self.dp, 1, c.n_kv_heads))
        return KVCache(self.cache.k, self.cache.v, scale, scale)

    def batch(self) -> NamedSharding:
        """A per-slot array (slots first): split over dp, replicated over tp."""
        return NamedSharding(self.mesh, PartitionSpec("dp"))

    def spec(self, logical_axes: Sequence[str], shape: Sequence[int]) -> PartitionSpec:
        """PartitionSpec for an array with these logical axes. Each dimension takes the longest
        prefix of its mesh axes whose total size divides it (the rest of that dimension is
        replicated), so any head count or width gives a valid, if less split, sharding."""
        used: set[str] = set()
        out: list[Any] = []
        for name, size in zip(logical_axes, shape, strict=True):
            axes: list[str] = []
            for axis in RULES[name]:
                n = math.prod(self.mesh.shape[a] for a in axes + [axis])
                if axis in used or size % n:
                    break
                axes.append(axis)
            axes = [a for a in axes if self.mesh.shape[a] > 1]  # size-1 axes only clutter the spec
            used.update(axes)
            out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
        while out and out[-1] is None:
            out.pop()
        return PartitionSpec(*out)

    def sharding(self, logical_axes: Sequence[str], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    def _param(self, name: str, shape: tuple[int, ...]) -> NamedSharding:
        return self.sharding(LOGICAL_AXES[name], shape)

