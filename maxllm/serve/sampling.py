"""Next-token choice on device, one row per decode slot, each with its own options.

Order, as in transformers' logits processors: repetition penalty (on every token
the row has seen, prompt included: positive logits divided by the penalty,
negative ones multiplied), temperature, top-k, top-p; then a draw from the row's
own PRNG key, or the argmax when temperature is 0. The returned log-probability is
the chosen token's under the model's distribution (log-softmax of the raw logits),
as the OpenAI and TGI APIs report it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(
    logits_SV: jax.Array,
    temperature_S: jax.Array,
    top_k_S: jax.Array,
    top_p_S: jax.Array,
    penalty_S: jax.Array,
    seen_SV: jax.Array,
    keys_S: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(token ids (S,), their log-probabilities (S,)).

    The costly parts run only when some row needs them (`lax.cond`): a batch of
    greedy rows is one argmax; sorting happens only for top-k / top-p. A draw takes
    one uniform number per row and inverts the cumulative distribution, rather than
    a Gumbel number per vocabulary entry."""
    logits_SV = logits_SV.astype(jnp.float32)
    logprobs_SV = jax.nn.log_softmax(logits_SV, axis=-1)
    penalty = penalty_S[:, None]
    x = jnp.where(seen_SV & (penalty != 1.0),
                  jnp.where(logits_SV > 0, logits_SV / penalty, logits_SV * penalty), logits_SV)
    greedy_S = jnp.argmax(x, axis=-1).astype(jnp.int32)

    def truncate(x):
        V = x.shape[-1]
        sorted_SV = -jnp.sort(-x, axis=-1)  # descending
        k = jnp.where(top_k_S > 0, jnp.minimum(top_k_S, V), V)
        kth_S1 = jnp.take_along_axis(sorted_SV, (k - 1)[:, None], axis=-1)
        x = jnp.where(x < kth_S1, -jnp.inf, x)
        # top-p: keep the smallest prefix of the sorted tokens whose mass reaches p.
        sorted_SV = jnp.where(jnp.arange(V)[None, :] < k[:, None], sorted_SV, -jnp.inf)
        probs_SV = jax.nn.softmax(sorted_SV, axis=-1)
        mass_before_SV = jnp.cumsum(probs_SV, axis=-1) - probs_SV
        keep_SV = mass_before_SV < top_p_S[:, None]
        cutoff_S1 = jnp.min(jnp.where(keep_SV, sorted_SV, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(x < cutoff_S1, -jnp.inf, x)

    def draw(x):
        x = x / jnp.maximum(temperature_S, 1e-6)[:, None]
        needs_cut = jnp.any((top_k_S > 0) | (top_p_S < 1.0))
        x = jax.lax.cond(needs_cut, truncate, lambda x: x, x)
        cdf_SV = jnp.cumsum(jax.nn.softmax(x, axis=-1), axis=-1)
        u_S = 1.0 - jax.vmap(jax.random.uniform)(keys_S)  # in (0, 1]
        index_S = jnp.sum(cdf_SV < (u_S * cdf_SV[:, -1])[:, None], axis=-1)
        drawn_S = jnp.minimum(index_S, x.shape[-1] - 1).astype(jnp.int32)
        return jnp.where(temperature_S <= 0, greedy_S, drawn_S)

    token_S = jax.lax.cond(jnp.any(temperature_S > 0), draw, lambda x: greedy_S, x)
    return token_S, jnp.take_along_axis(logprobs_SV, token_S[:, None], axis=-1)[:, 0]
