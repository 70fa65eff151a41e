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
from maxllm.mesh import constrain, is_sharded
from maxllm.models.attention import AttentionMask, attention, cached_attention
from maxllm.models import pipeline
from maxllm.models.context import context_attention
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
KEY_S_AXIS, VALUE_S_AXIS = 3, 2  # the length axis of the cached keys and values


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

        if kv_cache is None and is_sharded("length"):
            out_BTNH = context_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, positions_BT,
                                         self.cfg.context_parallel, self.cfg.attention)
        elif kv_cache is None:
            mask = AttentionMask(segment_ids_BT, positions_BT, segment_ids_BT, positions_BT, True)
            out_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, mask, self.cfg.attention)
        else:
            # This layer's own key and value buffers: the new rows are written in
            # place and attention reads the buffers as they lie.
            index_B = kv_cache["index"]
            k_BKHS = _write_rows_at(kv_cache["k"], k_BTKH.astype(kv_cache["k"].dtype), index_B, KEY_S_AXIS)
            v_BKSH = _write_rows_at(kv_cache["v"], v_BTKH.astype(kv_cache["v"].dtype), index_B, VALUE_S_AXIS)
            mask = AttentionMask(
                segment_ids_BT,
                positions_BT,
                kv_cache["segment_ids"],
                kv_cache["positions"],
                False,
            )
            out_BTNH = cached_attention(q_BTNH, k_BKHS.astype(dt), v_BKSH.astype(dt), mask)
            kv_cache = {**kv_cache, "k": k_BKHS, "v": v_BKSH}
        out_BTNH = checkpoint_name(out_BTNH, "attn_out")
        out_BTD = dense(out_BTNH, self.wo[...].astype(dt), contract=2)
        return out_BTD, kv_cache


class Block(nnx.Module):
    """One decoder layer. A family with another feed-forward (Mixtral's experts)
    overrides `make_mlp` and `feed_forward`; the attention half is shared."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...]):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs, stack=stack)
        self.attn = Attention(cfg, rngs=rngs, stack=stack)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs, stack=stack)
        self.mlp = self.make_mlp(cfg, rngs=rngs, stack=stack)

    def make_mlp(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...]) -> nnx.Module:
        return SwiGLU(cfg.d_model, cfg.mlp_dim, cfg.init_std, rngs=rngs, stack=stack)

    def feed_forward(self, x_BTD, segment_ids_BT, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The MLP's output and this layer's statistics for `aux` (none here)."""
        return self.mlp(x_BTD), {}

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, kv_cache, train: bool = False):
        h_BTD, kv_cache = self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT, kv_cache)
        x_BTD = constrain(x_BTD + h_BTD, ("batch", "length", "embed"))
        h_BTD, stats = self.feed_forward(self.mlp_norm(x_BTD), segment_ids_BT, train)
        x_BTD = x_BTD + h_BTD
        return constrain(x_BTD, ("batch", "length", "embed")), kv_cache, stats


class Llama(nnx.Module):
    block_cls: type[Block] = Block

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, rngs=rngs)
        self.layers = self.block_cls(cfg, rngs=rngs, stack=(cfg.num_layers,))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std)

    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        cache: Cache | None = None,
        logit_index_B: jax.Array | None = None,
        train: bool = False,
    ) -> tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
        """Logits (B, T, V) in float32, the updated cache (or None), and `aux`:
        {"loss": {name: weighted per-token loss}, "metrics": {name: value}} for
        families with auxiliary losses (Mixtral's router), else {}.

        With `logit_index_B`, only the logits at that index of each row, (B, 1, V):
        a prefill needs the last prompt token's, and the output projection over
        every position would cost as much as a third of the forward.

        `train=True` is the training step's forward: an MoE's expert capacity
        applies (assignments past it are dropped). Otherwise (evaluation,
        scoring, decoding) every token reaches its experts, so a sequence's
        logits never depend on the rest of the batch."""
        cfg = self.cfg
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones_like(tokens_BT)
        x_BTD = self.embed(tokens_BT, compute_dtype(cfg.dtype))
        if cache is not None:
            cache = _cache_append_meta(cache, positions_BT, segment_ids_BT)
        x_BTD, cache, stats = self._run_layers(x_BTD, positions_BT, segment_ids_BT, cache, train)
        if logit_index_B is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logit_index_B[:, None, None], axis=1)
        x_BTD = self.final_norm(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = self.embed.attend(x_BTD)
        else:
            head_DV = self.lm_head[...].astype(x_BTD.dtype)
            logits_BTV = dense(x_BTD, head_DV, preferred_element_type=jnp.float32)
        logits_BTV = constrain(logits_BTV, ("batch", "length", "vocab"))
        if cache is not None:
            cache = {**cache, "index": cache["index"] + jnp.sum(segment_ids_BT != 0, axis=1)}
        return logits_BTV, cache, self.aux(stats) if stats else {}

    def aux(self, stats_L: dict[str, jax.Array]) -> dict[str, dict[str, jax.Array]]:
        """`aux` from the layers' statistics, stacked over layers (L, ...)."""
        return {}

    def _stack(self, graphdef, stacked, x_BTD, positions_BT, segment_ids_BT, train):
        """The layers of `stacked` (leading dimension: layers) applied in order,
        with the remat policy; their statistics stacked (layers, ...)."""

        def body(x_BTD, params):
            x_BTD, _, stats = nnx.merge(graphdef, params)(x_BTD, positions_BT, segment_ids_BT, None, train)
            return x_BTD, stats

        body = remat(body, self.cfg.remat, scanned=self.cfg.scan_layers)
        if self.cfg.scan_layers:
            return jax.lax.scan(body, x_BTD, stacked)
        per_layer = []
        for i in range(jax.tree.leaves(stacked)[0].shape[0]):
            x_BTD, stats = body(x_BTD, jax.tree.map(lambda a: a[i], stacked))
            per_layer.append(stats)
        return x_BTD, jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)

    def _run_layers(self, x_BTD, positions_BT, segment_ids_BT, cache, train=False):
        """Scans (or loops) one block over the stacked layer parameters. A decode
        cache holds one key and one value buffer per layer; unrolled, each layer
        writes its new rows into its own buffers in place and reads them without a
        copy (a slice of a stacked cache would be copied every step)."""
        graphdef, stacked = nnx.split(self.layers)
        if cache is None and pipeline.num_stages() > 1:
            if type(self).aux is not Llama.aux:
                raise ValueError(f"mesh.stage > 1 is not supported for the {self.cfg.family} family: its "
                                 "layers' statistics (auxiliary losses) are not carried through the pipeline")

            def run_stage(chunk, x_BTD, positions_BT, segment_ids_BT):
                return self._stack(graphdef, chunk, x_BTD, positions_BT, segment_ids_BT, train)[0]

            return pipeline.pipeline(run_stage, stacked, x_BTD, positions_BT, segment_ids_BT), None, {}
        if cache is None:
            x_BTD, stats_L = self._stack(graphdef, stacked, x_BTD, positions_BT, segment_ids_BT, train)
            return x_BTD, None, stats_L

        def decode_body(x_BTD, layer):
            params, k, v = layer
            x_BTD, kv_cache, _ = nnx.merge(graphdef, params)(x_BTD, positions_BT, segment_ids_BT,
                                                             {**cache, "k": k, "v": v})
            return x_BTD, (kv_cache["k"], kv_cache["v"])

        if self.cfg.scan_layers:  # compiles once for any depth; copies the cache per step
            x_BTD, (k_L, v_L) = jax.lax.scan(decode_body, x_BTD, (stacked, jnp.stack(cache["k"]), jnp.stack(cache["v"])))
            ks, vs = list(k_L), list(v_L)
        else:
            ks, vs = [], []
            for i in range(self.cfg.num_layers):
                layer = (jax.tree.map(lambda a: a[i], stacked), cache["k"][i], cache["v"][i])
                x_BTD, (k, v) = decode_body(x_BTD, layer)
                ks.append(k)
                vs.append(v)
        return x_BTD, {**cache, "k": ks, "v": vs}, {}

    # Which axis of each cache leaf is the batch (a decode slot): the serving engine
    # inserts one prefilled row into a slot along it, whatever the family's cache.
    CACHE_BATCH_AXES = {"k": 0, "v": 0, "positions": 0, "segment_ids": 0, "index": 0}

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> Cache:
        """An empty decode cache: for each layer, keys (B, K, H, S) and values
        (B, K, S, H), the layouts attention reads them in; and per row, the
        positions and segment ids of what is stored and the next write index.

        Callers size it: a write past `length` is clamped by dynamic_update_slice
        and would overwrite the newest entries, so prompt + generation <= length."""
        cfg = self.cfg
        dtype = dtype or compute_dtype(cfg.dtype)
        L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_size
        return {
            "k": [jnp.zeros((batch, K, H, length), dtype) for _ in range(L)],  # KEY_S_AXIS = 3
            "v": [jnp.zeros((batch, K, length, H), dtype) for _ in range(L)],  # VALUE_S_AXIS = 2
            "positions": jnp.zeros((batch, length), jnp.int32),
            "segment_ids": jnp.zeros((batch, length), jnp.int32),
            "index": jnp.zeros((batch,), jnp.int32),
        }


def _write_rows(buf_BS_: jax.Array, new_BT_: jax.Array, index_B: jax.Array) -> jax.Array:
    """Writes each row's new entries at that row's own index."""
    return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice_in_dim(b, n, i, axis=0))(
        buf_BS_, new_BT_, index_B
    )


def _write_rows_at(buf: jax.Array, new_BTKH: jax.Array, index_B: jax.Array, s_axis: int) -> jax.Array:
    """Writes row b's T new entries at [b, ..., index_b : index_b + T, ...] of a
    (B, K, H, S) or (B, K, S, H) buffer, `s_axis` its length axis (a scatter, in
    place on a donated buffer). Entries past the cache length are dropped:
    callers size the cache for prompt + generation."""
    B, T = new_BTKH.shape[:2]
    rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    cols_BT = index_B[:, None] + jnp.arange(T)[None, :]
    # The two index arrays are apart (slices between), so the indexed axes lead
    # the update: (B, T, K, H) for either layout.
    index = (rows_BT, slice(None), cols_BT) if s_axis == 2 else (rows_BT, slice(None), slice(None), cols_BT)
    return buf.at[index].set(new_BTKH, mode="drop")


def _cache_append_meta(cache: Cache, positions_BT, segment_ids_BT) -> Cache:
    index_B = cache["index"]
    return {
        **cache,
        "positions": _write_rows(cache["positions"], positions_BT.astype(jnp.int32), index_B),
        "segment_ids": _write_rows(cache["segment_ids"], segment_ids_BT.astype(jnp.int32), index_B),
    }
