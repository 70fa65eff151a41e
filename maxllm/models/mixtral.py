"""Mixtral: the Llama decoder with a routed mixture of SwiGLU experts as its MLP.

    x = embed(tokens)
    for each layer:  x += attn(rms_norm(x));  x += moe(rms_norm(x))
    logits = lm_head(rms_norm(x))

Attention, norms, embedding and the decode cache are Llama's (`maxllm.models.llama`);
the experts, router, dispatch and expert parallelism are `maxllm.models.moe`. The
hyperparameters are `maxllm.config.MixtralConfig` (Llama's plus `moe:`). Parameters
follow Hugging Face's `MixtralForCausalLM`: `block_sparse_moe.gate.weight` (E, D) is
our router (D, E); `experts.e.w1/w3/w2` are rows e of our gate/up/down, transposed.

`aux` (see `Llama.__call__`), averaged over layers:
    loss:    moe_load_balance (x moe.aux_loss_coef), moe_z (x moe.z_loss_coef)
    metrics: moe_load_balance_loss, moe_z_loss, moe_dropped_fraction,
             moe_load (E,): the fraction of assignments each expert received,
             moe_load_max_min: the largest max/min load ratio over the layers
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maxllm.config import MixtralConfig
from maxllm.models.llama import Block, Llama
from maxllm.models.moe import MoE


class MixtralBlock(Block):
    def make_mlp(self, cfg: MixtralConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...]) -> nnx.Module:
        return MoE(cfg.d_model, cfg.mlp_dim, cfg.moe, cfg.init_std, rngs=rngs, stack=stack)

    def feed_forward(self, x_BTD, segment_ids_BT, train: bool):
        return self.mlp(x_BTD, segment_ids_BT != 0, drop=train)


class Mixtral(Llama):
    block_cls = MixtralBlock

    def aux(self, stats_L: dict[str, jax.Array]) -> dict[str, dict[str, jax.Array]]:
        moe = self.cfg.moe
        load_balance = jnp.mean(stats_L["load_balance"])
        z = jnp.mean(stats_L["z"])
        load_LE = stats_L["load"]
        ratio_L = jnp.max(load_LE, axis=-1) / jnp.min(load_LE, axis=-1)
        return {
            "loss": {"moe_load_balance": moe.aux_loss_coef * load_balance, "moe_z": moe.z_loss_coef * z},
            "metrics": {
                "moe_load_balance_loss": load_balance,
                "moe_z_loss": z,
                "moe_dropped_fraction": jnp.mean(stats_L["dropped"]),
                "moe_load": jnp.mean(load_LE, axis=0),
                "moe_load_max_min": jnp.max(ratio_L),
            },
        }
