"""Products of activations with weights, as one 2-D matrix product each.

A weight puts its contracted axes first (wq is (D, H, Dh), wo is (H, Dh, D)) and meets the last
axes of the activations. `jnp.einsum` hands such a product to XLA as a dot with several free or
contracted dimensions, which XLA's CPU backend runs through a slow generic loop (4-5x slower than
its matrix-vector kernel on the demo model's attention weights). Flattening both operands to
matrices first costs nothing (the reshapes are bitcasts) and gives every backend its plain GEMM.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def weight_einsum(equation: str, x: jax.Array, w: jax.Array, *, preferred_element_type: Any = None) -> jax.Array:
    """`jnp.einsum(equation, x, w)`, as a matrix product when `w`'s leading axes are contracted
    with `x`'s trailing ones and the output is x's other axes then w's ("btd,dnh->btnh")."""
    inputs, out = equation.split("->")
    xs, ws = inputs.split(",")
    n = sum(c in xs for c in ws)
    contracted, produced = ws[:n], ws[n:]
    if n and xs.endswith(contracted) and out == xs[: len(xs) - n] + produced and not set(produced) & set(xs):
        batch, k = x.shape[: x.ndim - n], math.prod(w.shape[:n])
        y = jnp.dot(x.reshape(math.prod(batch), k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
        return y.reshape(*batch, *w.shape[n:])
    return jnp.einsum(equation, x, w, preferred_element_type=preferred_element_type)
