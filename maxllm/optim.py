"""Optimizer and learning-rate schedules (optax)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from maxllm.config import TrainConfig

# Parameters named so are never weight-decayed: norm scales and biases.
_NO_DECAY_NAMES = ("scale", "bias")


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine, warmup-stable-decay or constant."""
    peak, end = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, cfg.steps)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(cfg.steps, warmup + 1), end_value=end
        )
    ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if cfg.schedule == "constant":
        return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
    # wsd: warmup, hold at peak, then a linear decay over the last decay_fraction.
    decay = max(1, round(cfg.steps * cfg.decay_fraction))
    stable_end = max(warmup, cfg.steps - decay)
    return optax.join_schedules(
        [ramp, optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)],
        [warmup, stable_end],
    )


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but norms and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in _NO_DECAY_NAMES, params
    )


def build_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay masked off norms and biases, after
    global-norm clipping."""
    parts = []
    if cfg.clip_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
