"""Mixture-of-experts feed-forward: a router and SwiGLU experts, two dispatch paths.

    router:    p = softmax(x @ W_r) in float32; each token takes its top-k experts,
               their probabilities renormalized to sum to 1 (Mixtral).
    dropless:  the (token, expert) assignments sorted by expert and run through a
               grouped matmul (`jax.lax.ragged_dot`); no token is ever dropped.
    capacity:  each batch row gives every expert C = ceil(k * T * factor / E)
               slots; assignments beyond them are dropped (counted); the
               experts run as one batched matmul over the (E, B, C, D) slots
               (GShard, Switch). First choices take slots before second choices.

Auxiliary losses, per layer, over the tokens that are not padding:
    load balance:  E * sum_e f_e * P_e   f_e: fraction of assignments to e,
                                         P_e: mean router probability of e
                   (Switch Transformer; 1.0 when perfectly balanced)
    router z-loss: mean_t logsumexp(router logits_t)^2   (ST-MoE)

Expert parallelism: the experts dimension of the expert weights is sharded over
the mesh axes of the `experts` rule. The dispatch then runs in `jax.shard_map`,
manual over those axes and the batch axes (the others, e.g. `tensor`, stay with
the compiler): capacity mode exchanges the dispatched slots with an all-to-all
and sends the results back with another; dropless mode gathers the tokens of
the expert group, runs its local experts, and reduce-scatters the sums back
(XLA:CPU has no ragged all-to-all, and a padded one would move k times the
tokens; see docs/moe.md).

Letters: B batch, T tokens, D model, F expert MLP width, E experts, C capacity,
K top-k choices (here not kv heads), A assignments (tokens x K).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from maxllm.config import MoEConfig
from maxllm.mesh import ShardingError, active_rules, logical_to_spec
from maxllm.models.layers import param

Stats = dict[str, jax.Array]


def dispatch_mode(cfg: MoEConfig, backend: str | None = None) -> str:
    """`auto` -> `dropless` on TPU, where `ragged_dot` is a grouped-matmul kernel;
    `capacity` on CPU and GPU, where it lowers to a dense matmul per expert
    (measured on CPU: 5.5x slower than the einsum path at E=8; docs/moe.md)."""
    if cfg.dispatch != "auto":
        return cfg.dispatch
    return "dropless" if (backend or jax.default_backend()) == "tpu" else "capacity"


def capacity(cfg: MoEConfig, tokens: int) -> int:
    """Slots per expert for a group of `tokens`; never more than `tokens` (an
    expert receives a token at most once)."""
    return max(1, min(tokens, math.ceil(cfg.top_k * tokens * cfg.capacity_factor / cfg.num_experts)))


# ---------------------------------------------------------------------------------
# Router


def route(x_BTD: jax.Array, router_DE: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(weights (B,T,K) float32 summing to 1, expert ids (B,T,K), probabilities
    (B,T,E), logits (B,T,E)), all routing math in float32."""
    logits_BTE = jnp.einsum("btd,de->bte", x_BTD.astype(jnp.float32), router_DE.astype(jnp.float32))
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    top_BTK, experts_BTK = jax.lax.top_k(probs_BTE, top_k)
    weights_BTK = top_BTK / jnp.sum(top_BTK, axis=-1, keepdims=True)
    return weights_BTK, experts_BTK, probs_BTE, logits_BTE


def router_stats(probs_BTE, logits_BTE, experts_BTK, mask_BT) -> Stats:
    """Load-balancing loss, z-loss and per-expert load over the unmasked tokens."""
    E, K = probs_BTE.shape[-1], experts_BTK.shape[-1]
    mask = mask_BT.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    counts_E = jnp.einsum("btke,bt->e", jax.nn.one_hot(experts_BTK, E, dtype=jnp.float32), mask)
    f_E = counts_E / (n * K)
    p_E = jnp.einsum("bte,bt->e", probs_BTE, mask) / n
    z_BT = jnp.square(jax.nn.logsumexp(logits_BTE, axis=-1))
    return {
        "load_balance": E * jnp.sum(f_E * p_E),
        "z": jnp.sum(z_BT * mask) / n,
        "load": f_E,
    }


# ---------------------------------------------------------------------------------
# Experts on one device's tokens


def _swiglu_grouped(x_AD, gate_EDF, up_EDF, down_EFD, sizes_E):
    dt = x_AD.dtype
    g = jax.lax.ragged_dot(x_AD, gate_EDF.astype(dt), sizes_E)
    u = jax.lax.ragged_dot(x_AD, up_EDF.astype(dt), sizes_E)
    return jax.lax.ragged_dot(jax.nn.silu(g) * u, down_EFD.astype(dt), sizes_E)


def _swiglu_slots(x_EGCD, gate_EDF, up_EDF, down_EFD):
    dt = x_EGCD.dtype
    g = jnp.einsum("egcd,edf->egcf", x_EGCD, gate_EDF.astype(dt))
    u = jnp.einsum("egcd,edf->egcf", x_EGCD, up_EDF.astype(dt))
    return jnp.einsum("egcf,efd->egcd", jax.nn.silu(g) * u, down_EFD.astype(dt))


def dropless_experts(x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD, ep_axes=()):
    """Every assignment computed: sorted by expert, one grouped matmul per
    projection. With `ep_axes` (inside shard_map), this device holds experts
    [i * E_local, (i+1) * E_local) and the tokens of all devices on those axes
    are gathered first; the partial sums are reduce-scattered back."""
    B, T, D = x_BTD.shape
    K = experts_BTK.shape[-1]
    E_local = gate_EDF.shape[0]
    x_ND = x_BTD.reshape(B * T, D)
    experts_NK = experts_BTK.reshape(B * T, K)
    weights_NK = weights_BTK.reshape(B * T, K)
    if ep_axes:
        x_ND = jax.lax.all_gather(x_ND, ep_axes, tiled=True)
        experts_NK = jax.lax.all_gather(experts_NK, ep_axes, tiled=True)
        weights_NK = jax.lax.all_gather(weights_NK, ep_axes, tiled=True)
        experts_NK = experts_NK - jax.lax.axis_index(ep_axes) * E_local
    N = x_ND.shape[0]
    local_A = experts_NK.reshape(-1)
    mine_A = (local_A >= 0) & (local_A < E_local)
    group_A = jnp.where(mine_A, local_A, E_local)  # others' experts sort last, outside every group
    order_A = jnp.argsort(group_A, stable=True)
    sizes_E = jnp.bincount(group_A, length=E_local + 1)[:E_local].astype(jnp.int32)
    y_AD = _swiglu_grouped(x_ND[order_A // K], gate_EDF, up_EDF, down_EFD, sizes_E)
    y_AD = jnp.zeros_like(y_AD).at[order_A].set(y_AD)
    w_A = jnp.where(mine_A, weights_NK.reshape(-1), 0.0)
    y_ND = jnp.sum((y_AD.astype(jnp.float32) * w_A[:, None]).reshape(N, K, D), axis=1)
    if ep_axes:
        y_ND = jax.lax.psum_scatter(y_ND, ep_axes, scatter_dimension=0, tiled=True)
    return y_ND.reshape(B, T, D).astype(x_BTD.dtype), jnp.zeros((), jnp.float32)


def capacity_experts(x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD, slots, num_experts, ep_axes=()):
    """Each row gives each expert `slots` places, taken in order of choice rank,
    then token. Returns the outputs and the number of dropped assignments. With
    `ep_axes`, the (E, B, C, D) slots go to the experts' devices by all-to-all.

    The slots are filled and read back by index (a gather each way), not by
    einsums with a (B, T, E, C) one-hot, whose B*T*E*C*D multiply-adds cost a
    quarter of the experts' own work at capacity factor 1.25."""
    B, T, D = x_BTD.shape
    K, E = experts_BTK.shape[-1], num_experts
    valid_BTK = weights_BTK > 0  # masked (padding) tokens carry zero weights
    onehot_BKTE = (jax.nn.one_hot(experts_BTK, E, dtype=jnp.int32) * valid_BTK[..., None]).transpose(0, 2, 1, 3)
    # Place of each assignment in its expert's queue: first choices of all tokens, then second choices.
    position_BKTE = jnp.cumsum(onehot_BKTE.reshape(B, K * T, E), axis=1).reshape(B, K, T, E) - 1
    position_BTK = jnp.take_along_axis(position_BKTE.transpose(0, 2, 1, 3), experts_BTK[..., None], axis=-1)[..., 0]
    kept_BTK = valid_BTK & (position_BTK < slots)
    dropped = jnp.sum(valid_BTK) - jnp.sum(kept_BTK)

    # The token in each slot; T (a zero row appended to x) marks an empty slot.
    rows_BTK = jnp.broadcast_to(jnp.arange(B)[:, None, None], (B, T, K))
    tokens_BTK = jnp.broadcast_to(jnp.arange(T)[None, :, None], (B, T, K))
    slot_BTK = jnp.where(kept_BTK, position_BTK, slots)  # out of range: not written
    token_BEC = jnp.full((B, E, slots), T, jnp.int32).at[rows_BTK, experts_BTK, slot_BTK].set(tokens_BTK, mode="drop")
    x_padded = jnp.concatenate([x_BTD, jnp.zeros((B, 1, D), x_BTD.dtype)], axis=1)
    x_EBCD = x_padded[jnp.arange(B)[:, None, None], token_BEC].transpose(1, 0, 2, 3)

    if ep_axes:
        x_EBCD = jax.lax.all_to_all(x_EBCD, ep_axes, 0, 1, tiled=True)  # (E_local, ep * B, C, D)
    y_EBCD = _swiglu_slots(x_EBCD, gate_EDF, up_EDF, down_EFD)
    if ep_axes:
        y_EBCD = jax.lax.all_to_all(y_EBCD, ep_axes, 1, 0, tiled=True)  # back to (E, B, C, D)

    y_BTKD = y_EBCD.transpose(1, 0, 2, 3)[rows_BTK, experts_BTK, jnp.minimum(position_BTK, slots - 1)]
    w_BTK = jnp.where(kept_BTK, weights_BTK, 0.0)
    y_BTD = jnp.einsum("btkd,btk->btd", y_BTKD.astype(jnp.float32), w_BTK)
    return y_BTD.astype(x_BTD.dtype), dropped.astype(jnp.float32)


# ---------------------------------------------------------------------------------
# The layer


class MoE(nnx.Module):
    """Router + E SwiGLU experts. Weights: router (D, E), gate/up (E, D, F),
    down (E, F, D), as Mixtral's w1/w3/w2 per expert, transposed."""

    def __init__(self, d: int, f: int, cfg: MoEConfig, std: float, *, rngs: nnx.Rngs, stack=()):
        E = cfg.num_experts
        # Replicated: D x E is tiny (32K values a layer in Mixtral-8x7B) and every
        # device routes its own tokens with all of it.
        self.router = param(rngs, (d, E), (None, None), std=std, stack=stack)
        self.gate = param(rngs, (E, d, f), ("experts", "embed", "mlp"), std=std, stack=stack)
        self.up = param(rngs, (E, d, f), ("experts", "embed", "mlp"), std=std, stack=stack)
        self.down = param(rngs, (E, f, d), ("experts", "mlp", "embed"), std=std, stack=stack)
        self.cfg = cfg

    def __call__(self, x_BTD: jax.Array, mask_BT: jax.Array, drop: bool = False) -> tuple[jax.Array, Stats]:
        """Outputs (B, T, D) and this layer's statistics. Masked tokens (padding)
        get zero output, take no capacity and do not count in the statistics.
        Capacity mode drops assignments past `capacity_factor` only with `drop`
        (training); otherwise every expert has room for all T tokens of a row, so
        evaluation and serving never depend on what else is in the batch."""
        cfg = self.cfg
        weights_BTK, experts_BTK, probs_BTE, logits_BTE = route(x_BTD, self.router[...], cfg.top_k)
        weights_BTK = weights_BTK * mask_BT[..., None].astype(weights_BTK.dtype)
        stats = router_stats(probs_BTE, logits_BTE, experts_BTK, mask_BT)
        mode = dispatch_mode(cfg)
        slots = capacity(cfg, x_BTD.shape[1]) if drop else x_BTD.shape[1]
        weights = (self.gate[...], self.up[...], self.down[...])
        y_BTD, dropped = _sharded_experts(mode, x_BTD, weights_BTK, experts_BTK, weights, slots, cfg.num_experts)
        assigned = jnp.maximum(jnp.sum(mask_BT.astype(jnp.float32)) * cfg.top_k, 1.0)
        stats["dropped"] = dropped / assigned
        return y_BTD, stats


def _sharded_experts(mode, x_BTD, weights_BTK, experts_BTK, weights, slots, num_experts):
    """Runs the dispatch on each device's own tokens: directly without a mesh,
    else in a shard_map manual over the batch and expert mesh axes."""

    def run(x, w, e, gate, up, down, ep_axes=()):
        if mode == "dropless":
            return dropless_experts(x, w, e, gate, up, down, ep_axes)
        return capacity_experts(x, w, e, gate, up, down, slots, num_experts, ep_axes)

    active = active_rules()
    if active is None:
        return run(x_BTD, weights_BTK, experts_BTK, *weights)
    rules, mesh = active
    batch_spec = logical_to_spec(("batch",), rules, mesh)[0]
    expert_spec = logical_to_spec(("experts",), rules, mesh)[0]
    batch_axes, ep_axes = _names(batch_spec), _names(expert_spec)
    manual = set(batch_axes) | set(ep_axes)
    if not manual:
        return run(x_BTD, weights_BTK, experts_BTK, *weights)
    if num_experts % math.prod(mesh.shape[a] for a in ep_axes):
        raise ShardingError(f"moe.num_experts={num_experts} does not divide the expert mesh axes {ep_axes}")
    tokens = PartitionSpec(batch_spec)
    expert_weights = PartitionSpec(expert_spec)

    def local(x, w, e, gate, up, down):
        y, dropped = run(x, w, e, gate, up, down, ep_axes)
        return y, jax.lax.psum(dropped, batch_axes) if batch_axes else dropped

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, expert_weights, expert_weights, expert_weights),
        out_specs=(tokens, PartitionSpec()),
        axis_names=manual,
        check_vma=False,
    )
    return fn(x_BTD, weights_BTK, experts_BTK, *weights)


def _names(spec: Any) -> tuple[str, ...]:
    if spec is None:
        return ()
    return (spec,) if isinstance(spec, str) else tuple(spec)
