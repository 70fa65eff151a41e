"""Mamba-1 (as `MambaForCausalLM`): selective state-space blocks, no attention.

    x = embed(tokens)                         the residual stream stays float32
    for each layer:  x += mixer(rms_norm(x))
    logits = lm_head(rms_norm(x))             tied to the embedding by default

    mixer(x):  u, z = x @ in_proj                       (B, T, I) each
               u = silu(causal depthwise conv_W(u))     kernel W = 4
               dt_low, B, C = u @ x_proj                (R), (G), (G)
               dt = softplus(dt_low @ dt_proj + dt_bias)
               h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t    A = -exp(A_log), (I, G)
               y_t = h_t . C_t + D u_t;   y = y * silu(z);   out = y @ out_proj

Training runs the recurrence as a chunked scan: `lax.scan` over chunks of
`scan_chunk` tokens carrying the float32 state (B, I, G), and within a chunk a
parallel `associative_scan`; each chunk is rematerialized in the backward, so
the (B, T, I, G) tensor of the whole sequence never exists. Packed rows reset
the state (and the convolution window) where a new segment starts.

Decoding: the family's cache is, per layer, the last W-1 inputs of the
convolution and the SSM state; any number of new tokens continues from them
(a prefill of the prompt, then one token per step), at a cost that does not
grow with the context.

Letters: B batch, T length, D model, I inner width, G state size, R dt rank,
W conv kernel, L layers, V vocab.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from maxllm.config import MambaConfig
from maxllm.mesh import constrain
from maxllm.models.layers import Embed, RMSNorm, compute_dtype, dense, param, remat

Cache = dict[str, Any]


def _uniform(bound):
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class Mixer(nnx.Module):
    """The selective SSM block, initialized as the reference implementation does."""

    def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...]):
        D, I, G, R, W = cfg.d_model, cfg.inner, cfg.ssm_state, cfg.rank, cfg.conv_kernel
        self.in_proj = param(rngs, (D, 2, I), ("embed", None, "ssm_inner"), std=cfg.init_std, stack=stack)
        self.conv_weight = param(rngs, (W, I), (None, "ssm_inner"), init=_uniform(1 / math.sqrt(W)), stack=stack)
        self.conv_bias = param(rngs, (I,), ("ssm_inner",), init=lambda k, s: jnp.zeros(s), stack=stack)
        self.x_proj = param(rngs, (I, R + 2 * G), ("ssm_inner", None), std=cfg.init_std, stack=stack)
        self.dt_proj = param(rngs, (R, I), (None, "ssm_inner"), init=_uniform(R**-0.5), stack=stack)

        def dt_bias(key, shape):  # softplus^-1 of step sizes log-uniform in [dt_min, dt_max]
            lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
            dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape) * (hi - lo) + lo), cfg.dt_init_floor)
            return dt + jnp.log(-jnp.expm1(-dt))

        self.dt_bias = param(rngs, (I,), ("ssm_inner",), init=dt_bias, stack=stack)
        a_log = lambda k, s: jnp.broadcast_to(jnp.log(jnp.arange(1, G + 1, dtype=jnp.float32)), s)  # noqa: E731
        self.A_log = param(rngs, (I, G), ("ssm_inner", "ssm_state"), init=a_log, stack=stack)
        self.D = param(rngs, (I,), ("ssm_inner",), init=lambda k, s: jnp.ones(s), stack=stack)
        self.out_proj = param(rngs, (I, D), ("ssm_inner", "embed"), init=_uniform(1 / math.sqrt(I)), stack=stack)
        self.cfg = cfg

    def __call__(self, x_BTD, segment_ids_BT, state: Cache | None):
        """Output (B, T, D) and, with `state` ({"conv", "ssm"} of this layer), the
        state after the new tokens (padding at the end of a row leaves it as is)."""
        cfg = self.cfg
        dt = x_BTD.dtype
        W, G, R = cfg.conv_kernel, cfg.ssm_state, cfg.rank
        B, T, _ = x_BTD.shape
        valid_BT = segment_ids_BT != 0
        uz_BT2I = dense(x_BTD, self.in_proj[...].astype(dt))
        u_BTI = uz_BT2I[:, :, 0] * valid_BT[..., None].astype(dt)
        z_BTI = uz_BT2I[:, :, 1]
        u_BTI = constrain(u_BTI, ("batch", "length", "ssm_inner"))

        # Causal depthwise convolution over the previous W-1 inputs (the cache, or
        # zeros) and the new ones, never across a segment boundary.
        if state is None:
            prev_BWI = jnp.zeros((B, W - 1, u_BTI.shape[-1]), dt)
            prev_seg_BW = jnp.full((B, W - 1), -1, segment_ids_BT.dtype)
        else:
            prev_BWI = state["conv"].astype(dt)
            prev_seg_BW = jnp.broadcast_to(segment_ids_BT[:, :1], (B, W - 1))  # the cached tokens: same sequence
        cat_BSI = jnp.concatenate([prev_BWI, u_BTI], axis=1)
        cat_seg_BS = jnp.concatenate([prev_seg_BW, segment_ids_BT], axis=1)
        weight_WI = self.conv_weight[...].astype(dt)
        conv_BTI = jnp.zeros_like(u_BTI) + self.conv_bias[...].astype(dt)
        for w in range(W):
            same_BT = cat_seg_BS[:, w : w + T] == segment_ids_BT
            conv_BTI = conv_BTI + weight_WI[w] * cat_BSI[:, w : w + T] * same_BT[..., None].astype(dt)
        v_BTI = jax.nn.silu(conv_BTI) * valid_BT[..., None].astype(dt)

        dbc_BTK = dense(v_BTI, self.x_proj[...].astype(dt))
        dt_low_BTR, b_BTG, c_BTG = jnp.split(dbc_BTK, [R, R + G], axis=-1)
        delta_BTI = jax.nn.softplus(
            dense(dt_low_BTR, self.dt_proj[...].astype(dt)).astype(jnp.float32) + self.dt_bias[...]
        ) * valid_BT[..., None]
        # A new segment starts from a zero state: its first token does not decay the carried one.
        prev_seg_B1 = segment_ids_BT[:, :1] if state is not None else jnp.full((B, 1), -1, segment_ids_BT.dtype)
        keep_BT = jnp.concatenate([prev_seg_B1, segment_ids_BT[:, :-1]], axis=1) == segment_ids_BT
        keep_BT = keep_BT | ~valid_BT  # padding passes the state through (delta 0: no decay, no input)
        h0_BIG = None if state is None else state["ssm"]
        y_BTI, h_BIG = selective_scan(
            delta_BTI, -jnp.exp(self.A_log[...]), b_BTG.astype(jnp.float32), c_BTG.astype(jnp.float32),
            v_BTI.astype(jnp.float32), keep_BT, h0_BIG, cfg.scan_chunk,
        )
        y_BTI = (y_BTI + v_BTI.astype(jnp.float32) * self.D[...]).astype(dt) * jax.nn.silu(z_BTI)
        out_BTD = dense(y_BTI, self.out_proj[...].astype(dt))
        if state is None:
            return out_BTD, None
        # The convolution's next window: the last W-1 inputs up to each row's last real token.
        n_B = jnp.sum(valid_BT, axis=1)
        take_BW = n_B[:, None] + jnp.arange(W - 1)[None, :]
        conv_state = jnp.take_along_axis(cat_BSI, take_BW[..., None], axis=1)
        return out_BTD, {"conv": conv_state.astype(state["conv"].dtype), "ssm": h_BIG}


def selective_scan(delta_BTI, A_IG, b_BTG, c_BTG, u_BTI, keep_BT, h0_BIG, chunk: int):
    """y_t = h_t . C_t with h_t = keep_t * exp(delta_t A) h_{t-1} + delta_t B_t u_t,
    float32; returns (y (B, T, I), h at the end). Chunks of `chunk` tokens: a
    sequential scan over chunks, a parallel one within, recomputed in the backward."""
    B, T, I = delta_BTI.shape
    G = A_IG.shape[-1]
    chunk = min(chunk, T)  # a decode step (T = 1) is one plain update
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:  # trailing positions that change nothing: no decay, no input
        delta_BTI = jnp.pad(delta_BTI, ((0, 0), (0, pad), (0, 0)))
        u_BTI = jnp.pad(u_BTI, ((0, 0), (0, pad), (0, 0)))
        b_BTG = jnp.pad(b_BTG, ((0, 0), (0, pad), (0, 0)))
        c_BTG = jnp.pad(c_BTG, ((0, 0), (0, pad), (0, 0)))
        keep_BT = jnp.pad(keep_BT, ((0, 0), (0, pad)), constant_values=True)

    def chunks(x):  # (B, n*chunk, ...) -> (n, B, chunk, ...)
        return x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_r * a_l, a_r * b_l + b_r

    @jax.checkpoint
    def body(h_BIG, xs):
        delta, b, c, u, keep = xs
        a_BLIG = jnp.exp(delta[..., None] * A_IG) * keep[..., None, None]
        x_BLIG = (delta * u)[..., None] * b[:, :, None, :]
        a_cum, x_cum = jax.lax.associative_scan(combine, (a_BLIG, x_BLIG), axis=1)
        h_BLIG = a_cum * h_BIG[:, None] + x_cum
        return h_BLIG[:, -1], jnp.einsum("blig,blg->bli", h_BLIG, c)

    h0 = jnp.zeros((B, I, G), jnp.float32) if h0_BIG is None else h0_BIG
    h, y = jax.lax.scan(body, h0, tuple(map(chunks, (delta_BTI, b_BTG, c_BTG, u_BTI, keep_BT))))
    y_BTI = y.swapaxes(0, 1).reshape(B, n * chunk, I)[:, :T]
    return y_BTI, h


class Block(nnx.Module):
    def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...]):
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs, stack=stack)
        self.mixer = Mixer(cfg, rngs=rngs, stack=stack)
        self.dtype = compute_dtype(cfg.dtype)

    def __call__(self, x_BTD, segment_ids_BT, state):
        h_BTD, state = self.mixer(self.norm(x_BTD).astype(self.dtype), segment_ids_BT, state)
        return constrain(x_BTD + h_BTD.astype(jnp.float32), ("batch", "length", "embed")), state


class Mamba(nnx.Module):
    def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, rngs=rngs)
        self.layers = Block(cfg, rngs=rngs, stack=(cfg.num_layers,))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std)

    def __call__(self, tokens_BT, positions_BT, segment_ids_BT=None, cache: Cache | None = None,
                 logit_index_B=None, train: bool = False):
        """As `Llama.__call__`; positions are unused (order is the recurrence's)."""
        cfg = self.cfg
        dt = compute_dtype(cfg.dtype)
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones_like(tokens_BT)
        x_BTD = self.embed(tokens_BT, dt).astype(jnp.float32)  # residual stream in float32, as HF's default
        x_BTD, cache = self._run_layers(x_BTD, segment_ids_BT, cache)
        if logit_index_B is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logit_index_B[:, None, None], axis=1)
        x_BTD = self.final_norm(x_BTD).astype(dt)
        if cfg.tie_embeddings:
            logits_BTV = self.embed.attend(x_BTD)
        else:
            logits_BTV = dense(x_BTD, self.lm_head[...].astype(dt), preferred_element_type=jnp.float32)
        logits_BTV = constrain(logits_BTV, ("batch", "length", "vocab"))
        if cache is not None:
            cache = {**cache, "index": cache["index"] + jnp.sum(segment_ids_BT != 0, axis=1)}
        return logits_BTV, cache, {}

    def _run_layers(self, x_BTD, segment_ids_BT, cache):
        graphdef, stacked = nnx.split(self.layers)
        if cache is None:
            def body(x_BTD, params):
                return nnx.merge(graphdef, params)(x_BTD, segment_ids_BT, None)[0], None

            body = remat(body, self.cfg.remat, scanned=self.cfg.scan_layers)
            if self.cfg.scan_layers:
                return jax.lax.scan(body, x_BTD, stacked)[0], None
            for i in range(self.cfg.num_layers):
                x_BTD, _ = body(x_BTD, jax.tree.map(lambda a: a[i], stacked))
            return x_BTD, None
        convs, ssms = [], []
        for i in range(self.cfg.num_layers):  # per-layer state buffers, updated in place
            layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))
            x_BTD, state = layer(x_BTD, segment_ids_BT, {"conv": cache["conv"][i], "ssm": cache["ssm"][i]})
            convs.append(state["conv"])
            ssms.append(state["ssm"])
        return x_BTD, {**cache, "conv": convs, "ssm": ssms}

    CACHE_BATCH_AXES = {"conv": 0, "ssm": 0, "index": 0}

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> Cache:
        """An empty decode state: per layer the convolution's last W-1 inputs
        (B, W-1, I) and the SSM state (B, I, G) in float32, and per row the
        number of tokens seen. Its size does not depend on `length`."""
        cfg = self.cfg
        dtype = dtype or compute_dtype(cfg.dtype)
        L, W, I, G = cfg.num_layers, cfg.conv_kernel, cfg.inner, cfg.ssm_state
        return {
            "conv": [jnp.zeros((batch, W - 1, I), dtype) for _ in range(L)],
            "ssm": [jnp.zeros((batch, I, G), jnp.float32) for _ in range(L)],
            "index": jnp.zeros((batch,), jnp.int32),
        }
