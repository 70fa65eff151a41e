"""Context parallelism: attention over a length dimension split across devices.

When the activation rules split `length` (mesh.sequence > 1), every projection,
norm and MLP works on its own slice of each row with no communication; only
attention needs keys from other slices. Two ways to get them
(`model.context_parallel`):

- `all_gather`: each device gathers the keys and values of the whole row (within
  the sequence axis) and attends its queries to them. One collective per layer;
  the gathered keys and values and the (T/S x T) scores live on every device.
- `ring`: keys and values travel around the sequence axis in S - 1 `ppermute`
  hops while each device folds every visiting block into an online softmax
  (Liu et al., Ring Attention). Memory per device stays at one block of keys, so
  very long rows fit; a block that no query of the device may see is skipped.

Which keys a query sees is decided by positions and segment ids, never by index
(`maxllm.models.attention`), so the tokens of a row may sit on the devices in any
order. With a causal mask, contiguous slices would leave the first device almost
idle and the last doing most of the work; `load_balanced_order` instead cuts a
row into 2S chunks and gives device i chunks i and 2S-1-i, an early and a late
one, so every device has the same number of visible keys. The train step
reorders the batch that way (the loss is a sum over tokens, so the order does
not change it).

Letters as in `maxllm.models.attention`; C = T / S, the tokens of one device.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from maxllm.mesh import active_rules, logical_to_spec
from maxllm.models.attention import AttentionMask, Backend, attention, per_device

Strategy = Literal["all_gather", "ring"]

def load_balanced_order(length: int, shards: int) -> np.ndarray:
    """A permutation of range(length): shard i of the result holds chunks i and
    2*shards-1-i of 2*shards equal chunks."""
    if length % (2 * shards):
        raise ValueError(f"length {length} does not split into 2 x {shards} equal chunks")
    chunks = np.arange(length).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)])


def context_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    segment_ids_BT: jax.Array,
    positions_BT: jax.Array,
    strategy: Strategy,
    backend: Backend,
) -> jax.Array:
    """Self-attention of rows whose length is split over the mesh (the enclosing
    `activation_rules` say how); the result is split like `q_BTNH`."""
    rules, mesh = active_rules()
    axis = logical_to_spec(("batch", "length"), rules, mesh)[1]  # the mesh axes the length is split over
    shards = int(np.prod([mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis)]))

    def local(q, k, v, seg, pos):
        if strategy == "all_gather":
            gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)  # noqa: E731
            mask = AttentionMask(seg, pos, gather(seg), gather(pos), False)
            return attention(q, gather(k), gather(v), mask, backend)
        if strategy == "ring":
            return _ring(q, k, v, seg, pos, axis, shards)
        raise ValueError(f"unknown model.context_parallel {strategy!r}; use all_gather or ring")

    return per_device(local, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, positions_BT)


def _ring(q_BCNH, k_BCKH, v_BCKH, seg_BC, pos_BC, axis, shards: int) -> jax.Array:
    """This device's queries against every device's keys, one block per hop,
    with an online softmax in float32."""
    B, C, N, H = q_BCNH.shape
    K = k_BCKH.shape[2]
    q_BKGCH = (q_BCNH * jnp.asarray(H**-0.5, q_BCNH.dtype)).reshape(B, C, K, N // K, H).transpose(0, 2, 3, 1, 4)
    lowest = jnp.finfo(jnp.float32).min
    peak_BKGC1 = jnp.full((B, K, N // K, C, 1), lowest, jnp.float32)
    total_BKGC1 = jnp.zeros((B, K, N // K, C, 1), jnp.float32)
    out_BKGCH = jnp.zeros((B, K, N // K, C, H), jnp.float32)
    kv = (k_BCKH.transpose(0, 2, 1, 3), v_BCKH.transpose(0, 2, 1, 3), seg_BC, pos_BC)  # keys BKCH
    hop = [(i, (i + 1) % shards) for i in range(shards)]

    def fold(acc, kv, allowed_B11CC):
        """The online-softmax update with one block of keys. As in the dense
        path, masked scores are the lowest finite float, not -inf: until a row
        meets a key it may see, its peak is that value and its running sums are
        garbage that the first visible key scales to exactly zero."""
        peak, total, out = acc
        k_BKCH, v_BKCH, _, _ = kv
        logits = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGCH, k_BKCH, preferred_element_type=jnp.float32)
        logits = jnp.where(allowed_B11CC, logits, lowest)
        # The shift cancels between numerator and denominator: a constant to autodiff.
        new_peak = jax.lax.stop_gradient(jnp.maximum(peak, jnp.max(logits, axis=-1, keepdims=True)))
        scale = jnp.exp(peak - new_peak)
        weights = jnp.exp(logits - new_peak)
        total = total * scale + jnp.sum(weights, axis=-1, keepdims=True)
        out = out * scale + jnp.einsum("BKGTS,BKSH->BKGTH", weights.astype(v_BKCH.dtype), v_BKCH,
                                       preferred_element_type=jnp.float32)
        return new_peak, total, out

    acc = (peak_BKGC1, total_BKGC1, out_BKGCH)
    for step in range(shards):
        if step:
            kv = jax.tree.map(lambda x: jax.lax.ppermute(x, axis, hop), kv)
        allowed_B1CC = AttentionMask(seg_BC, pos_BC, kv[2], kv[3], False).dense()
        # A block no query of this device may see (above the diagonal, another document) is skipped.
        acc = jax.lax.cond(jnp.any(allowed_B1CC), fold, lambda acc, kv, allowed: acc, acc, kv, allowed_B1CC[:, :, None])
    _, total, out = acc
    out_BKGCH = (out / total).astype(v_BCKH.dtype)
    return out_BKGCH.transpose(0, 3, 1, 2, 4).reshape(B, C, N, H)
