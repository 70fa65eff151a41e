"""Pieces shared by the model families: parameters with logical axes, RMSNorm,
embedding, SwiGLU MLP, rotary embeddings, remat policies.

Einsum letters (fixed across the code): B batch, T query length, S key length,
D model width, N query heads, K kv heads, H head dim, F MLP width, V vocab.

Layers of a stack are built once with a leading `layers` dimension on every
parameter (`stack=(L,)`); the family's forward scans over that dimension and calls
the module on one layer's slice, so `__call__` code sees unstacked shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxllm.mesh import constrain, is_sharded

Dtype = jnp.dtype


def param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    axes: Sequence[str],
    *,
    std: float | None = None,
    stack: Sequence[int] = (),
    init: Callable[[jax.Array, tuple[int, ...]], jax.Array] | None = None,
) -> nnx.Param:
    """A float32 parameter named by logical axes: normal(0, std), or ones when
    std is None (norm scales), or `init(key, shape)` when given."""
    full = (*stack, *shape)
    names = (*("layers",) * len(stack), *axes)
    if init is not None:
        value = init(rngs.params(), full).astype(jnp.float32)
    elif std is None:
        value = jnp.ones(full, jnp.float32)
    else:
        value = std * jax.random.normal(rngs.params(), full, jnp.float32)
    return nnx.Param(value, axes=names)


def dense(x: jax.Array, w: jax.Array, contract: int = 1, **kwargs) -> jax.Array:
    """Contracts the last `contract` dims of x with the first of w, e.g. BTD,DNH->BTNH.

    Done as one 2-D matmul over flattened (B*T) rows where that is free: XLA's CPU
    backend runs the 3-D form ~1.5x slower (forward + backward). When the length
    dimension is sharded (sequence parallelism) the merged rows would need an
    all-gather, so the contraction keeps B and T apart.
    """
    if is_sharded("length"):
        return jnp.tensordot(x, w, axes=contract, **kwargs)
    lead, inner, out = x.shape[: x.ndim - contract], w.shape[:contract], w.shape[contract:]
    k = math.prod(inner)
    y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), **kwargs)
    return y.reshape(*lead, *out)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, stack: Sequence[int] = ()):
        self.scale = param(rngs, (dim,), ("norm",), std=None, stack=stack)
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        # As Hugging Face's LlamaRMSNorm: normalize in float32, cast, then scale.
        return self.scale[...].astype(x_BTD.dtype) * x.astype(x_BTD.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, std: float, *, rngs: nnx.Rngs):
        self.table = param(rngs, (vocab, dim), ("vocab", "embed"), std=std)

    def __call__(self, tokens_BT: jax.Array, dtype: Dtype) -> jax.Array:
        table = self.table[...]
        if hasattr(table, "take_rows"):  # int8 serving weights: gather rows, then dequantize
            return table.take_rows(tokens_BT).astype(dtype)
        x_BTD = jnp.take(table.astype(dtype), tokens_BT, axis=0)
        return constrain(x_BTD, ("batch", "length", "embed"))

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """Tied LM head: logits against the embedding table, in float32."""
        table_DV = self.table[...].astype(x_BTD.dtype).T
        return dense(x_BTD, table_DV, preferred_element_type=jnp.float32)


class SwiGLU(nnx.Module):
    def __init__(self, d: int, f: int, std: float, *, rngs: nnx.Rngs, stack: Sequence[int] = ()):
        self.gate = param(rngs, (d, f), ("embed", "mlp"), std=std, stack=stack)
        self.up = param(rngs, (d, f), ("embed", "mlp"), std=std, stack=stack)
        self.down = param(rngs, (f, d), ("mlp", "embed"), std=std, stack=stack)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        dt = x_BTD.dtype
        gate_BTF = dense(x_BTD, self.gate[...].astype(dt))
        up_BTF = dense(x_BTD, self.up[...].astype(dt))
        h_BTF = jax.nn.silu(gate_BTF) * up_BTF
        h_BTF = checkpoint_name(h_BTF, "mlp_hidden")
        h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
        return dense(h_BTF, self.down[...].astype(dt))


# ---------------------------------------------------------------------------------
# Rotary position embeddings (Hugging Face's half-split layout)


def rope_inv_freq(head_dim: int, theta: float, scaling: object | None = None) -> np.ndarray:
    """Inverse frequencies (H/2,), with Llama 3.1's long-context scaling when given."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq.astype(np.float32)
    factor = scaling.factor
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    cos = jnp.cos(angles_BTh)[:, :, None, :]
    sin = jnp.sin(angles_BTh)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


# ---------------------------------------------------------------------------------
# Activation checkpointing

_SAVED_NAMES = ("query_proj", "key_proj", "value_proj", "attn_out", "mlp_hidden")

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": jax.checkpoint_policies.save_only_these_names(*_SAVED_NAMES),
}


def remat(fn: Callable, policy: str, *, scanned: bool) -> Callable:
    """Wraps one layer's body with the named checkpoint policy (`none`: no remat)."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=not scanned)


def compute_dtype(name: str) -> Dtype:
    if name == "auto":
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
    return jnp.dtype(name)
