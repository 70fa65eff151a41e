"""Direct preference optimization (Rafailov et al., 2023) and its variants.

For a prompt x with a chosen answer y_w and a rejected one y_l, the policy π and a
frozen reference π_ref give sequence log-probabilities (summed over the answer's
tokens, as TRL sums them) and

    h = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)]

`dpo.loss_type` picks the loss of h, with β = `dpo.beta` and ε = `dpo.label_smoothing`:
- sigmoid (DPO; with ε > 0 conservative DPO): -(1-ε) log σ(βh) - ε log σ(-βh)
- robust (Chowdhury et al., 2024, unbiased under a fraction ε of flipped labels):
  [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1 - 2ε)
- hinge (RSO, Liu et al., 2023): max(0, 1 - βh)
- ipo (Azar et al., 2023): (h - 1/(2β))², with log-probabilities averaged over the
  answer's tokens instead of summed (as TRL's IPO does)

Metrics carry TRL's names: `rewards/chosen` = β (log π(y_w|x) - log π_ref(y_w|x)),
`rewards/rejected` likewise, `rewards/margins` their difference, `rewards/accuracies`
the fraction of pairs whose chosen reward is the larger, and `logps/chosen`,
`logps/rejected` the policy's sequence log-probabilities; each is a mean over pairs.

A batch holds P pairs as (P, 2, T) arrays, the chosen sequence first in each pair;
the reference's log-probabilities come either from a frozen copy of the starting
parameters in the train state (`ref_params`) or, with `dpo.precompute_ref`, from
the batch (`ref_logps`, computed once before training by the same forward).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from maxllm.config import DPOConfig
from maxllm.data.pipeline import BATCH_KEYS

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")
SEQUENCE_KEYS = BATCH_KEYS  # each (P, 2, T) in a DPO batch


def sequence_logps(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed log-probability of the masked targets, their count), per row."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    logp_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    logp_BT = logp_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
    return jnp.sum(logp_BT * mask_BT, axis=-1), jnp.sum(mask_BT, axis=-1)


def dpo_losses(
    policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
    *, beta: float, loss_type: str, label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair losses and per-pair metrics (average them over pairs) from
    sequence log-probabilities of shape (P,)."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = jnp.square(h - 1 / (2 * beta))
    else:
        raise ValueError(f"dpo.loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    chosen_reward = jax.lax.stop_gradient(beta * chosen_ratio)
    rejected_reward = jax.lax.stop_gradient(beta * rejected_ratio)
    metrics = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).astype(jnp.float32),
        "logps/chosen": jax.lax.stop_gradient(policy_chosen),
        "logps/rejected": jax.lax.stop_gradient(policy_rejected),
    }
    return losses, metrics


def pair_logps(graphdef: nnx.GraphDef, params: Any, batch: dict, *, average: bool, train: bool) -> tuple[jax.Array, dict]:
    """Sequence log-probabilities (P, 2) of a batch of pairs under `params`, and the
    model's aux output. `average`: per-token means (IPO) instead of sums."""
    P, _, T = batch["inputs"].shape
    rows = {k: batch[k].reshape(2 * P, T) for k in SEQUENCE_KEYS}
    model = nnx.merge(graphdef, params)
    logits_BTV, _, aux = model(rows["inputs"], rows["positions"], rows["segment_ids"], train=train)
    logps, counts = sequence_logps(logits_BTV, rows["targets"], rows["loss_mask"])
    if average:
        logps = logps / jnp.maximum(counts, 1.0)
    return logps.reshape(P, 2), aux


def dpo_objective(cfg: DPOConfig, graphdef: nnx.GraphDef) -> Callable:
    """The DPO objective for `maxllm.train.make_train_step`: (params, batch, frozen
    reference params or None) -> (summed loss, (pairs, summed metrics, aux metrics))."""
    average = cfg.loss_type == "ipo"

    def objective(params, batch, ref_params):
        logps, aux = pair_logps(graphdef, params, batch, average=average, train=True)
        if ref_params is None:
            ref = batch["ref_logps"]
        else:
            ref, _ = pair_logps(graphdef, jax.lax.stop_gradient(ref_params), batch, average=average, train=False)
        losses, metrics = dpo_losses(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=cfg.beta,
                                     loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
        pairs = jnp.asarray(losses.shape[0], jnp.float32)
        total = jnp.sum(losses) + sum(aux.get("loss", {}).values(), jnp.zeros(())) * pairs
        sums = {"loss": jnp.sum(losses), **{k: jnp.sum(v) for k, v in metrics.items()}}
        return total, (pairs, sums, aux.get("metrics", {}))

    return objective
