"""Dot-product attention behind one function, with backends.

- `xla`: an explicit einsum with a dense mask; the reference, runs anywhere.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's flash
  kernel on NVIDIA GPUs (bfloat16/float16 only).

Which keys a query sees is given by segment ids and positions, never by a mask
the caller builds: a query attends to keys of its own segment at positions not
after its own. Packed rows therefore never attend across documents, and a decode
cache (keys at other indices than queries) uses the same rule. Segment id 0 marks
padding or an empty cache slot; real tokens have ids >= 1.

Letters: B batch, T query length, S key length, N query heads, K kv heads,
H head dim, G = N // K query heads per kv head.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Backend = Literal["xla", "cudnn"]


class AttentionMask(NamedTuple):
    q_segment_ids: jax.Array  # (B, T) int32
    q_positions: jax.Array  # (B, T) int32
    kv_segment_ids: jax.Array  # (B, S) int32
    kv_positions: jax.Array  # (B, S) int32
    # True when keys are the queries' own tokens in the same order (training,
    # prefill without a cache): causality is then by index, which flash kernels use.
    self_attention: bool

    def dense(self) -> jax.Array:
        """(B, 1, T, S) boolean: True where the query may attend to the key."""
        same = self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]
        causal = self.kv_positions[:, None, :] <= self.q_positions[:, :, None]
        return (same & causal)[:, None]


def attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask: AttentionMask,
    backend: Backend = "xla",
) -> jax.Array:
    if backend == "xla":
        return _xla(q_BTNH, k_BSKH, v_BSKH, mask)
    if backend == "cudnn":
        return _cudnn(q_BTNH, k_BSKH, v_BSKH, mask)
    raise ValueError(f"unknown attention backend {backend!r}; use xla or cudnn")


def _xla(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask: AttentionMask) -> jax.Array:
    # Put the batch-like dims (B, K) first and keep (G, T) in that order on both
    # einsums, so only the small q/k/v/out tensors are transposed, never the
    # (B, K, G, T, S) scores.
    return _xla_bk(q_BTNH, k_BSKH.transpose(0, 2, 1, 3), "BKSH", v_BSKH.transpose(0, 2, 1, 3), mask)


def cached_attention(q_BTNH: jax.Array, k_BKHS: jax.Array, v_BKSH: jax.Array, mask: AttentionMask) -> jax.Array:
    """Attention of new queries to a decode cache stored as the einsums read it:
    keys (B, K, H, S) and values (B, K, S, H), so no step copies the cache into
    another layout (XLA would otherwise transpose every layer's cache every token)."""
    return _xla_bk(q_BTNH, k_BKHS, "BKHS", v_BKSH, mask)


def _xla_bk(q_BTNH: jax.Array, k: jax.Array, k_layout: str, v_BKSH: jax.Array, mask: AttentionMask) -> jax.Array:
    """The einsum attention on keys laid out as `k_layout` (BKSH or BKHS)."""
    B, T, N, H = q_BTNH.shape
    K = k.shape[1]
    q_BKGTH = (q_BTNH * jnp.asarray(H**-0.5, q_BTNH.dtype)).reshape(B, T, K, N // K, H)
    q_BKGTH = q_BKGTH.transpose(0, 2, 3, 1, 4)
    logits_BKGTS = jnp.einsum(f"BKGTH,{k_layout}->BKGTS", q_BKGTH, k, preferred_element_type=jnp.float32)
    allowed_B11TS = mask.dense()[:, :, None]
    # A finite minimum, not -inf: a query with no visible key (padding) gets a
    # uniform average instead of NaN, and its loss is masked anyway.
    logits_BKGTS = jnp.where(allowed_B11TS, logits_BKGTS, jnp.finfo(jnp.float32).min)
    # Softmax with the normalization applied after the AV product: one pass less
    # over the scores (the division runs on the H-wide output instead).
    peak_BKGT1 = jax.lax.stop_gradient(jnp.max(logits_BKGTS, axis=-1, keepdims=True))
    weights_BKGTS = jnp.exp(logits_BKGTS - peak_BKGT1)
    total_BKGT1 = jnp.sum(weights_BKGTS, axis=-1, keepdims=True)
    out_BKGTH = jnp.einsum(
        "BKGTS,BKSH->BKGTH", weights_BKGTS.astype(v_BKSH.dtype), v_BKSH,
        preferred_element_type=jnp.float32,
    )
    out_BKGTH = (out_BKGTH / total_BKGT1).astype(v_BKSH.dtype)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _cudnn(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask: AttentionMask) -> jax.Array:
    if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention=cudnn needs bfloat16 or float16 activations, got {q_BTNH.dtype}; "
            "set model.dtype=bfloat16 or model.attention=xla"
        )
    return _flash(q_BTNH, k_BSKH, v_BSKH, mask, "cudnn")


def _flash(q_BTNH, k_BSKH, v_BSKH, mask: AttentionMask, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` with our mask semantics; `implementation`
    is "cudnn" in use and "xla" in tests, which check the mask plumbing on CPU."""
    if mask.self_attention:
        # Causal by index inside the kernel; only segment boundaries go in the mask.
        same_B1TS = (mask.q_segment_ids[:, :, None] == mask.kv_segment_ids[:, None, :])[:, None]
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=same_B1TS, is_causal=True, implementation=implementation
        )
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=mask.dense(), implementation=implementation
    )
