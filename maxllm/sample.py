"""Greedy continuation of prompts with the model's decode cache: prefill all
prompts at once (right-padded), then one jitted step per new token. The serving
engine (continuous batching, sampling options) builds on the same cache."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_generate(
    graphdef: nnx.GraphDef,
    params: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    max_seq_len: int,
    eos_id: int | None = None,
) -> list[list[int]]:
    """New token ids for each prompt; a row stops at `eos_id` (not included)."""
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_new_tokens > max_seq_len:
        raise ValueError(
            f"a {P}-token prompt plus {max_new_tokens} new tokens exceeds model.max_seq_len={max_seq_len}"
        )
    tokens = np.zeros((B, P), np.int32)
    segments = np.zeros((B, P), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        segments[i, : len(p)] = 1
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))

    @jax.jit
    def prefill(params, tokens, positions, segments, lengths):
        model = nnx.merge(graphdef, params)
        cache = model.init_cache(B, P + max_new_tokens)
        logits_BTV, cache, _ = model(tokens, positions, segments, cache)
        last_BV = jnp.take_along_axis(logits_BTV, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(last_BV, -1).astype(jnp.int32), cache

    @jax.jit
    def decode(params, token_B, cache):
        model = nnx.merge(graphdef, params)
        position_B1 = cache["index"][:, None]
        logits_B1V, cache, _ = model(token_B[:, None], position_B1, jnp.ones_like(position_B1), cache)
        return jnp.argmax(logits_B1V[:, 0], -1).astype(jnp.int32), cache

    token_B, cache = prefill(params, jnp.asarray(tokens), positions, jnp.asarray(segments), lengths)
    out = [token_B]
    for _ in range(max_new_tokens - 1):
        token_B, cache = decode(params, token_B, cache)
        # One step in flight at a time: on many CPU devices sharing few cores, XLA's
        # collectives deadlock when dozens of decode steps are queued at once
        # (seen with 8 virtual devices on 2 cores and fsdp-sharded parameters).
        token_B.block_until_ready()
        out.append(token_B)
    generated = np.asarray(jnp.stack(out, axis=1)).tolist()
    if eos_id is not None:
        generated = [row[: row.index(eos_id)] if eos_id in row else row for row in generated]
    return generated
