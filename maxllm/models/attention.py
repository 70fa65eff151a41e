"""Dot-product attention behind one function, with backends.

- `xla`: an explicit einsum with a dense mask; the reference, runs anywhere.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's flash
  kernel on NVIDIA GPUs (bfloat16/float16 only).
- `splash`: JAX's Pallas splash-attention kernel for TPU (block-sparse flash
  attention: blocks above the causal diagonal are never computed). Off TPU it
  runs in Pallas interpret mode, which is exact but slow: for tests.

Which keys a query sees is given by segment ids and positions, never by a mask
the caller builds: a query attends to keys of its own segment at positions not
after its own. Packed rows therefore never attend across documents, and a decode
cache (keys at other indices than queries) uses the same rule. Segment id 0 marks
padding or an empty cache slot; real tokens have ids >= 1.

Letters: B batch, T query length, S key length, N query heads, K kv heads,
H head dim, G = N // K query heads per kv head.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Backend = Literal["xla", "cudnn", "splash"]


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
    if backend == "splash":
        if not mask.self_attention:  # the kernel's mask is causal by index
            return _xla(q_BTNH, k_BSKH, v_BSKH, mask)
        return _splash(q_BTNH, k_BSKH, v_BSKH, mask)
    raise ValueError(f"unknown attention backend {backend!r}; use xla, cudnn or splash")


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


def per_device(fn, q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *rows_BT: jax.Array) -> jax.Array:
    """`fn(q, k, v, *rows)` on each device's block of the arrays (`jax.shard_map`),
    laid out by the enclosing activation rules: queries by heads, keys and values
    by kv heads, each (B, T) array by batch and length; the result is laid out like
    the queries. For what XLA does not partition itself: a Pallas kernel, or
    collectives over the length's mesh axis."""
    from maxllm.mesh import active_rules, logical_to_spec

    rules, mesh = active_rules()
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), rules, mesh, q_BTNH.shape, "queries")
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules, mesh, k_BSKH.shape,
                              "keys and values")
    row_spec = logical_to_spec(("batch", "length"), rules, mesh)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, *(row_spec,) * len(rows_BT)), out_specs=q_spec,
        check_vma=False,
    )(q_BTNH, k_BSKH, v_BSKH, *rows_BT)


def _splash(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask: AttentionMask) -> jax.Array:
    """Causal self-attention through the splash kernel. A Pallas kernel is not
    partitioned by XLA: on a mesh, each device runs it on its own rows and heads."""
    from maxllm.mesh import active_rules

    run = _splash_local if active_rules() is None else functools.partial(per_device, _splash_local)
    return run(q_BTNH, k_BSKH, v_BSKH, mask.q_segment_ids, mask.kv_segment_ids)


def _splash_local(q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS) -> jax.Array:
    """The kernel on whole rows, one (row, kv head) at a time: its MQA form takes
    the G query heads that share a key head. Segment ids keep packed documents
    apart, as in the other backends."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    block = _splash_block(T)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mqa_single_device(
        masks.MultiHeadMask([masks.CausalMask((T, T))] * G),
        block_sizes=sizes,
        interpret=jax.default_backend() != "tpu",
    )
    q_BKGTH = (q_BTNH * jnp.asarray(H**-0.5, q_BTNH.dtype)).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
    k_BKTH = k_BSKH.transpose(0, 2, 1, 3)
    v_BKTH = v_BSKH.transpose(0, 2, 1, 3)
    segments_B = splash.SegmentIds(q=q_segment_ids_BT, kv=kv_segment_ids_BS)
    per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over the K key heads of one row
    out_BKGTH = jax.vmap(per_head)(q_BKGTH, k_BKTH, v_BKTH, segments_B)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _splash_block(length: int) -> int:
    """The kernel's tile: 512 (its default) or the whole row when shorter; the
    length must be a multiple of 128, the TPU's lane width."""
    if length % 128:
        raise ValueError(f"attention=splash needs a length that is a multiple of 128, got {length}")
    return min(512, length) if length % min(512, length) == 0 else 128
