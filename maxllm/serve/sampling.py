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
    counter_S: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(token ids (S,), their log-probabilities (S,)).

    The costly parts run only when some row needs them (`lax.cond`): a batch of
    greedy rows is a max and a first-index search; sorting happens only for top-k / top-p. A draw takes
    one uniform number per row and inverts the cumulative distribution, rather than
    a Gumbel number per vocabulary entry. With `counter_S`, row s draws with
    `fold_in(keys_S[s], counter_S[s])`: a decode slot keeps one key and passes its
    position, and nothing is derived unless some row samples."""
    logits_SV = logits_SV.astype(jnp.float32)
    V = logits_SV.shape[-1]
    peak_S1 = jnp.max(logits_SV, axis=-1, keepdims=True)

    penalty = penalty_S[:, None]
    # Elementwise, so it fuses into the reductions below (a lax.cond returning the
    # (S, V) logits would copy them when no row has a penalty).
    x = jnp.where(seen_SV & (penalty != 1.0), jnp.where(logits_SV > 0, logits_SV / penalty, logits_SV * penalty),
                  logits_SV)
    # The first index of the maximum, as argmax picks it, from two plain reductions:
    # XLA:CPU runs jnp.argmax's (value, index) reduction several times slower.
    x_peak_S1 = jnp.max(x, axis=-1, keepdims=True)
    greedy_S = jnp.min(jnp.where(x == x_peak_S1, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    greedy_S = jnp.minimum(greedy_S, V - 1)  # all-NaN row: any index, not V

    def truncate(x):
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
        keys = keys_S if counter_S is None else jax.vmap(jax.random.fold_in)(keys_S, counter_S)
        u_S = 1.0 - jax.vmap(jax.random.uniform)(keys)  # in (0, 1]
        index_S = jnp.sum(cdf_SV < (u_S * cdf_SV[:, -1])[:, None], axis=-1)
        drawn_S = jnp.minimum(index_S, x.shape[-1] - 1).astype(jnp.int32)
        return jnp.where(temperature_S <= 0, greedy_S, drawn_S)

    token_S = jax.lax.cond(jnp.any(temperature_S > 0), draw, lambda x: greedy_S, x)
    # log-softmax at the chosen token only: logit - peak - log(sum(exp(logits - peak)))
    log_total_S = jnp.log(jnp.sum(jnp.exp(logits_SV - peak_S1), axis=-1))
    chosen_S = jnp.take_along_axis(logits_SV, token_S[:, None], axis=-1)[:, 0]
    return token_S, chosen_S - peak_S1[:, 0] - log_total_S
