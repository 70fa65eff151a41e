"""Weight-only int8 at load time (`--quantize int8`).

Each matrix is stored as int8 with one float scale per output channel (symmetric,
scale = max |w| over the contracted axes / 127), the scheme of Qwix's weight-only
PTQ. An `Int8Weight` stands where the float array stood in the parameter tree; the
model reads weights as `param[...].astype(dtype)`, which dequantizes right where
the weight is used (layer by layer), so weights rest in memory
at about half their bfloat16 size. Norm scales stay float.

Why not Qwix itself: its PTQ intercepts `dot_general`/`einsum` calls whose operand
is a module parameter. maxllm keeps each weight stacked over layers, splits and
merges the layer module inside `lax.scan`, and feeds weights through reshapes into
2-D matmuls; `qwix.quantize_model` (0.1.8) left every weight of our Llama in
float32 when tried. Using it would mean writing the model around its conventions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Contracted axes of each weight (per layer), by leaf name: what the scale spans.
# An MoE's gate/up/down carry a leading experts axis (E, D, F): one more to skip.
# Its router stays float: it is small, and routing flips on small changes.
CONTRACTED = {
    "wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1),
    "gate": (0,), "up": (0,), "down": (0,),
    "lm_head": (0,), "table": (1,),
}
EXPERT_WEIGHTS = ("gate", "up", "down")


@jax.tree_util.register_pytree_node_class
class Int8Weight:
    """int8 values and float scales; `w[...]` then `.astype(dtype)` dequantizes."""

    def __init__(self, q: jax.Array, scale: jax.Array):
        self.q, self.scale = q, scale

    def tree_flatten(self):
        return (self.q, self.scale), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def __getitem__(self, index):
        if index is Ellipsis:
            return self
        return Int8Weight(self.q[index], self.scale[index])

    def take_rows(self, index: jax.Array) -> "Int8Weight":
        """Rows of an embedding table (per-row scales), still quantized."""
        return Int8Weight(jnp.take(self.q, index, axis=0), jnp.take(self.scale, index, axis=0))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def nbytes(self) -> int:
        return int(self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)

    def astype(self, dtype) -> jax.Array:
        return self.q.astype(dtype) * self.scale.astype(dtype)


def quantize_weight(w: jax.Array, contracted: tuple[int, ...], stacked: bool, scale_dtype=jnp.bfloat16) -> Int8Weight:
    axes = tuple(a + 1 for a in contracted) if stacked else contracted
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return Int8Weight(q, scale.astype(scale_dtype))


def quantize_params(params: dict) -> dict:
    """The parameter tree with every matrix in CONTRACTED replaced by Int8Weight."""

    def walk(tree: Any, stacked: bool) -> Any:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out[key] = walk(value, stacked or key == "layers")
            elif key in CONTRACTED:
                contracted = CONTRACTED[key]
                if key in EXPERT_WEIGHTS and value.ndim - stacked == 3:
                    contracted = tuple(a + 1 for a in contracted)
                out[key] = jax.jit(quantize_weight, static_argnums=(1, 2))(value, contracted, stacked)
            else:
                out[key] = value
        return out

    return walk(params, False)


def weight_bytes(params: Any) -> int:
    """Bytes of the parameter tree as stored (int8 values + scales, or floats)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight))
    return sum(x.nbytes if isinstance(x, Int8Weight) else int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
