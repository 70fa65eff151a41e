"""Llama 2/3 decoder (also SmolLM, which has the same architecture).

    x = embed(tokens)
    for each layer:  x += attn(rms_norm(x));  x += swiglu(rms_norm(x))
    logits = lm_head(rms_norm(x))

Attention is grouped-query with rotary embeddings (Llama 3.1 frequency scaling
optional). The hyperparameters are `maxllm.config.LlamaConfig`. Parameters follow
Hugging Face's `LlamaForCausalLM` layout up to transposes and head reshapes:
q_proj.weight (N*H, D) is our wq (D, N, H).

Calling convention shared by every family:
    model(tokens, positions, segment_ids, cache=None) -> (logits, cache, aux)

Letters: B batch, T query length, S cache length, D model, N heads, K kv heads,
H head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from maxllm.config import LlamaConfig
from maxllm.mesh import constrain
from maxllm.models.attention import AttentionMask, attention
from maxllm.models.layers import (
    Embed,
    RMSNorm,
    SwiGLU,
    apply_rope,
    compute_dtype,
    dense,
    param,
    remat,
    rope_inv_freq,
)

Cache = dict[str, jax.Array]


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...]):
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        std = cfg.init_std
        self.wq = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), std=std, stack=stack)
        self.wk = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), std=std, stack=stack)
        self.wv = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), std=std, stack=stack)
        self.wo = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), std=std, stack=stack)
        self.cfg = cfg

    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array,
        kv_cache: Cache | None,
    ) -> tuple[jax.Array, Cache | None]:
        dt = x_BTD.dtype
        q_BTNH = dense(x_BTD, self.wq[...].astype(dt))
        k_BTKH = dense(x_BTD, self.wk[...].astype(dt))
        v_BTKH = dense(x_BTD, self.wv[...].astype(dt))
        q_BTNH = checkpoint_name(q_BTNH, "query_proj")
        k_BTKH = checkpoint_name(k_BTKH, "key_proj")
        v_BTKH = checkpoint_name(v_BTKH, "value_proj")
        q_BTNH = constrain(q_BTNH, ("batch", "length", "heads", "head_dim"))
        k_BTKH = constrain(k_BTKH, ("batch", "length", "kv_heads", "head_dim"))
        v_BTKH = constrain(v_BTKH, ("batch", "length", "kv_heads", "head_dim"))
        inv_freq = rope_inv_freq(self.cfg.head_size, self.cfg.rope_theta, self.cfg.rope_scaling)
        q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
        k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)

        if kv_cache is None:
            mask = AttentionMask(segment_ids_BT, positions_BT, segment_ids_BT, positions_BT, True)
            out_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, mask, self.cfg.attention)
        else:
            # The whole stacked cache comes in; only this layer's new rows are written,
            # in place, and this layer's keys and values read back.
            index_B, layer = kv_cache["index"], kv_cache["layer"]
            k_all = _write_layer_rows(kv_cache["k"], layer, k_BTKH.astype(kv_cache["k"].dtype), index_B)
            v_all = _write_layer_rows(kv_cache["v"], layer, v_BTKH.astype(kv_cache["v"].dtype), index_B)
            k_BSKH = jax.lax.dynamic_index_in_dim(k_all, layer, axis=0, keepdims=False)
            v_BSKH = jax.lax.dynamic_index_in_dim(v_all, layer, axis=0, keepdims=False)
            mask = AttentionMask(
                segment_ids_BT,
                positions_BT,
                kv_cache["segment_ids"],
                kv_cache["positions"],
                False,
            )
            out_BTNH = attention(q_BTNH, k_BSKH.astype(dt), v_BSKH.astype(dt), mask, "xla")
            kv_cache = {**kv_cache, "k": k_all, "v": v_all}
        out_BTNH = checkpoint_name(out_BTNH, "attn_out")
        out_BTD = dense(out_BTNH, self.wo[...].astype(dt), contract=2)
        return out_BTD, kv_cache


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...]):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs, stack=stack)
        self.attn = Attention(cfg, rngs=rngs, stack=stack)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs, stack=stack)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, cfg.init_std, rngs=rngs, stack=stack)

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, kv_cache):
        h_BTD, kv_cache = self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT, kv_cache)
        x_BTD = constrain(x_BTD + h_BTD, ("batch", "length", "embed"))
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return constrain(x_BTD, ("batch", "length", "embed")), kv_cache


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, rngs=rngs)
        self.layers = Block(cfg, rngs=rngs, stack=(cfg.num_layers,))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std)

    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
        """Logits (B, T, V) in float32, the updated cache (or None), aux losses ({})."""
        cfg = self.cfg
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones_like(tokens_BT)
        x_BTD = self.embed(tokens_BT, compute_dtype(cfg.dtype))
        if cache is not None:
            cache = _cache_append_meta(cache, positions_BT, segment_ids_BT)
        x_BTD, cache = self._run_layers(x_BTD, positions_BT, segment_ids_BT, cache)
        x_BTD = self.final_norm(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = self.embed.attend(x_BTD)
        else:
            head_DV = self.lm_head[...].astype(x_BTD.dtype)
            logits_BTV = dense(x_BTD, head_DV, preferred_element_type=jnp.float32)
        logits_BTV = constrain(logits_BTV, ("batch", "length", "vocab"))
        if cache is not None:
            cache = {**cache, "index": cache["index"] + jnp.sum(segment_ids_BT != 0, axis=1)}
        return logits_BTV, cache, {}

    def _run_layers(self, x_BTD, positions_BT, segment_ids_BT, cache):
        """Scans (or loops) one block over the stacked layer parameters. With a
        decode cache, the stacked keys and values ride along in the carry, so each
        layer writes its new rows in place instead of the cache being copied."""
        graphdef, stacked = nnx.split(self.layers)
        if cache is None:

            def body(x_BTD, params):
                x_BTD, _ = nnx.merge(graphdef, params)(x_BTD, positions_BT, segment_ids_BT, None)
                return x_BTD, None

            body = remat(body, self.cfg.remat, scanned=self.cfg.scan_layers)
            if self.cfg.scan_layers:
                x_BTD, _ = jax.lax.scan(body, x_BTD, stacked)
            else:
                for i in range(self.cfg.num_layers):
                    x_BTD, _ = body(x_BTD, jax.tree.map(lambda a: a[i], stacked))
            return x_BTD, None

        def decode_body(carry, layer):
            x_BTD, k_all, v_all = carry
            params, i = layer
            kv_cache = {**cache, "k": k_all, "v": v_all, "layer": i}
            x_BTD, kv_cache = nnx.merge(graphdef, params)(x_BTD, positions_BT, segment_ids_BT, kv_cache)
            return (x_BTD, kv_cache["k"], kv_cache["v"]), None

        carry = (x_BTD, cache["k"], cache["v"])
        if self.cfg.scan_layers:
            carry, _ = jax.lax.scan(decode_body, carry, (stacked, jnp.arange(self.cfg.num_layers)))
        else:
            for i in range(self.cfg.num_layers):
                carry, _ = decode_body(carry, (jax.tree.map(lambda a: a[i], stacked), i))
        x_BTD, k_all, v_all = carry
        return x_BTD, {**cache, "k": k_all, "v": v_all}

    # Which axis of each cache entry is the batch (a decode slot): the serving engine
    # inserts one prefilled row into a slot along it, whatever the family's cache.
    CACHE_BATCH_AXES = {"k": 1, "v": 1, "positions": 0, "segment_ids": 0, "index": 0}

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> Cache:
        """An empty decode cache: per-layer keys and values plus, per row, the
        positions and segment ids of what is stored and the next write index.

        Callers size it: a write past `length` is clamped by dynamic_update_slice
        and would overwrite the newest entries, so prompt + generation <= length."""
        cfg = self.cfg
        dtype = dtype or compute_dtype(cfg.dtype)
        kv_shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_size)
        return {
            "k": jnp.zeros(kv_shape, dtype),
            "v": jnp.zeros(kv_shape, dtype),
            "positions": jnp.zeros((batch, length), jnp.int32),
            "segment_ids": jnp.zeros((batch, length), jnp.int32),
            "index": jnp.zeros((batch,), jnp.int32),
        }


def _write_rows(buf_BS_: jax.Array, new_BT_: jax.Array, index_B: jax.Array) -> jax.Array:
    """Writes each row's new entries at that row's own index."""
    return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice_in_dim(b, n, i, axis=0))(
        buf_BS_, new_BT_, index_B
    )


def _write_layer_rows(buf_LBS_: jax.Array, layer, new_BT_: jax.Array, index_B: jax.Array) -> jax.Array:
    """Writes row b's T new entries at [layer, b, index_b : index_b + T] (a
    scatter, done in place on a donated or loop-carried buffer). Entries past the
    cache length are dropped: callers size the cache for prompt + generation."""
    B, T = new_BT_.shape[:2]
    rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    cols_BT = index_B[:, None] + jnp.arange(T)[None, :]
    return buf_LBS_.at[layer, rows_BT, cols_BT].set(new_BT_, mode="drop")


def _cache_append_meta(cache: Cache, positions_BT, segment_ids_BT) -> Cache:
    index_B = cache["index"]
    return {
        **cache,
        "positions": _write_rows(cache["positions"], positions_BT.astype(jnp.int32), index_B),
        "segment_ids": _write_rows(cache["segment_ids"], segment_ids_BT.astype(jnp.int32), index_B),
    }
