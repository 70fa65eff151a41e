"""Per-family tables between our parameter tree and Hugging Face tensor names.

A table row names one of our leaves (a path in the params tree), the HF tensor
name (with `{i}` for the layer index when the leaf is stacked over layers), and a
layout transform used in both directions. A family adapter adds the config
mapping (ours <-> `config.json`). The MoE and Mamba families add their own tables.

RoPE needs no permutation: our rotary embedding rotates the two halves of each
head (`rotate_half`), as `LlamaForCausalLM` does, so q/k weights map as they are.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np


class HFError(ValueError):
    """A Hugging Face folder or config that cannot be converted; the message names
    the file, key or tensor."""


# ---------------------------------------------------------------------------------
# Layout transforms: ours <-> HF for one tensor (per layer, for stacked leaves).


@dataclasses.dataclass(frozen=True)
class Transform:
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (hf tensor, our shape)
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # our shape -> HF shape


IDENTITY = Transform(lambda x: x, lambda x, shape: x, lambda shape: shape)
TRANSPOSE = Transform(lambda x: x.T, lambda x, shape: x.T, lambda shape: shape[::-1])
# (D, N, H) <-> nn.Linear (N*H, D): the q/k/v projections.
HEADS_IN = Transform(
    lambda x: x.reshape(x.shape[0], -1).T,
    lambda x, shape: x.T.reshape(shape),
    lambda shape: (math.prod(shape[1:]), shape[0]),
)
# (N, H, D) <-> nn.Linear (D, N*H): the output projection.
HEADS_OUT = Transform(
    lambda x: x.reshape(-1, x.shape[-1]).T,
    lambda x, shape: x.T.reshape(shape),
    lambda shape: (shape[-1], math.prod(shape[:-1])),
)


@dataclasses.dataclass(frozen=True)
class Row:
    ours: tuple[str, ...]  # path in our params tree
    hf: str  # HF tensor name; `{i}` the layer, `{e}` the expert of a stacked leaf
    transform: Transform = IDENTITY
    when: Callable[[Any], bool] = lambda cfg: True  # present for this config?

    @property
    def stacked_dims(self) -> int:
        """Leading dims of our leaf that index HF tensors: 0, 1 (layers) or 2 (layers, experts)."""
        return ("{i}" in self.hf) + ("{e}" in self.hf)

    def name(self, index: tuple[int, ...]) -> str:
        return self.hf.format(**dict(zip("ie", index)))


@dataclasses.dataclass(frozen=True)
class Adapter:
    family: str
    architecture: str  # config.json "architectures"
    model_type: str
    rows: tuple[Row, ...]
    to_hf_config: Callable[..., dict[str, Any]]
    from_hf_config: Callable[[dict[str, Any], str], dict[str, Any]]

    def rows_for(self, cfg: Any) -> list[Row]:
        return [r for r in self.rows if r.when(cfg)]

    def tensors(self, cfg: Any, leaf_shapes: dict[tuple[str, ...], tuple[int, ...]]) -> list[tuple[str, Row, tuple[int, ...], tuple[int, ...]]]:
        """Every HF tensor as (name, row, index into our leaf, HF shape), leaf by
        leaf; the index is () for an unstacked leaf, (layer,) or (layer, expert)."""
        out = []
        for row in self.rows_for(cfg):
            shape = leaf_shapes[row.ours]
            n = row.stacked_dims
            for index in np.ndindex(*shape[:n]):
                out.append((row.name(index), row, index, row.transform.hf_shape(shape[n:])))
        return out


# ---------------------------------------------------------------------------------
# Llama (LlamaForCausalLM; also SmolLM)

_LAYER = "model.layers.{i}."

LLAMA_ROWS = (
    Row(("embed", "table"), "model.embed_tokens.weight"),
    Row(("layers", "attn_norm", "scale"), _LAYER + "input_layernorm.weight"),
    Row(("layers", "attn", "wq"), _LAYER + "self_attn.q_proj.weight", HEADS_IN),
    Row(("layers", "attn", "wk"), _LAYER + "self_attn.k_proj.weight", HEADS_IN),
    Row(("layers", "attn", "wv"), _LAYER + "self_attn.v_proj.weight", HEADS_IN),
    Row(("layers", "attn", "wo"), _LAYER + "self_attn.o_proj.weight", HEADS_OUT),
    Row(("layers", "mlp_norm", "scale"), _LAYER + "post_attention_layernorm.weight"),
    Row(("layers", "mlp", "gate"), _LAYER + "mlp.gate_proj.weight", TRANSPOSE),
    Row(("layers", "mlp", "up"), _LAYER + "mlp.up_proj.weight", TRANSPOSE),
    Row(("layers", "mlp", "down"), _LAYER + "mlp.down_proj.weight", TRANSPOSE),
    Row(("final_norm", "scale"), "model.norm.weight"),
    Row(("lm_head",), "lm_head.weight", TRANSPOSE, when=lambda cfg: not cfg.tie_embeddings),
)


def llama_to_hf_config(cfg, *, bos_id: int | None, eos_id: int | None, dtype: str) -> dict[str, Any]:
    """config.json as transformers 5.x writes it for LlamaForCausalLM."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.type, "rope_theta": cfg.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        # The same, in the keys readers older than transformers 5 (vLLM, TGI) look for.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": dtype,
    }


def llama_from_hf_config(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Our `model:` section (the keys HF defines) from a Llama config.json."""

    def need(key: str) -> Any:
        if key not in hf:
            raise HFError(f"{where}: missing key {key!r}")
        return hf[key]

    for key, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False,)), ("mlp_bias", (False,))):
        if hf.get(key, allowed[0]) not in allowed:
            raise HFError(f"{where}: {key}={hf[key]!r} is not supported (maxllm's Llama has {allowed[0]!r})")
    rope = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = None
    if rope_type == "llama3":
        params = {**legacy, **rope}
        scaling = {"type": "llama3", **{k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                                "original_max_position_embeddings")}}
    elif rope_type != "default":
        raise HFError(f"{where}: rope_parameters.rope_type={rope_type!r} is not supported (default or llama3)")
    heads = need("num_attention_heads")
    return {
        "family": "llama",
        "vocab_size": need("vocab_size"),
        "d_model": need("hidden_size"),
        "num_layers": need("num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or need("hidden_size") // heads,
        "mlp_dim": need("intermediate_size"),
        "max_seq_len": need("max_position_embeddings"),
        "rope_theta": float(theta),
        "rope_scaling": scaling,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


LLAMA = Adapter("llama", "LlamaForCausalLM", "llama", LLAMA_ROWS, llama_to_hf_config, llama_from_hf_config)

# ---------------------------------------------------------------------------------
# Mixtral (MixtralForCausalLM). On disk, transformers 5 still writes (and reads)
# one tensor per expert under `block_sparse_moe`; in memory it fuses them.

_MOE = _LAYER + "block_sparse_moe."

MIXTRAL_ROWS = tuple(r for r in LLAMA_ROWS if r.ours[:2] != ("layers", "mlp")) + (
    Row(("layers", "mlp", "router"), _MOE + "gate.weight", TRANSPOSE),
    Row(("layers", "mlp", "gate"), _MOE + "experts.{e}.w1.weight", TRANSPOSE),
    Row(("layers", "mlp", "up"), _MOE + "experts.{e}.w3.weight", TRANSPOSE),
    Row(("layers", "mlp", "down"), _MOE + "experts.{e}.w2.weight", TRANSPOSE),
)


def mixtral_to_hf_config(cfg, *, bos_id: int | None, eos_id: int | None, dtype: str) -> dict[str, Any]:
    """config.json as transformers 5.x writes it for MixtralForCausalLM."""
    hf = llama_to_hf_config(cfg, bos_id=bos_id, eos_id=eos_id, dtype=dtype)
    for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
        del hf[key]
    moe = cfg.moe
    return {
        **hf,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss_coef,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "sliding_window": None,
    }


def mixtral_from_hf_config(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Our `model:` section from a Mixtral config.json; the MoE keys HF does not
    define (dispatch, capacity, z-loss) take maxllm's defaults."""
    if hf.get("sliding_window"):
        raise HFError(f"{where}: sliding_window={hf['sliding_window']} is not supported (maxllm attends to "
                      "the whole context; Mixtral-8x7B and later releases set null)")
    for key in ("num_local_experts", "num_experts_per_tok"):
        if key not in hf:
            raise HFError(f"{where}: missing key {key!r}")
    section = llama_from_hf_config({**hf, "attention_bias": False, "mlp_bias": False}, where)
    return {
        **section,
        "family": "mixtral",
        "moe": {
            "num_experts": hf["num_local_experts"],
            "top_k": hf["num_experts_per_tok"],
            "dispatch": "auto",
            "capacity_factor": 1.25,
            "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
            "z_loss_coef": 0.001,
        },
    }


MIXTRAL = Adapter("mixtral", "MixtralForCausalLM", "mixtral", MIXTRAL_ROWS, mixtral_to_hf_config,
                  mixtral_from_hf_config)

# ---------------------------------------------------------------------------------
# Mamba (MambaForCausalLM)

# (W, I) <-> nn.Conv1d depthwise weight (I, 1, W).
CONV = Transform(
    lambda x: x.T[:, None, :],
    lambda x, shape: x[:, 0, :].T,
    lambda shape: (shape[1], 1, shape[0]),
)

_MIXER = "backbone.layers.{i}.mixer."

MAMBA_ROWS = (
    Row(("embed", "table"), "backbone.embeddings.weight"),
    Row(("layers", "norm", "scale"), "backbone.layers.{i}.norm.weight"),
    Row(("layers", "mixer", "in_proj"), _MIXER + "in_proj.weight", HEADS_IN),  # (D, 2, I) <-> (2I, D): u rows, then z
    Row(("layers", "mixer", "conv_weight"), _MIXER + "conv1d.weight", CONV),
    Row(("layers", "mixer", "conv_bias"), _MIXER + "conv1d.bias"),
    Row(("layers", "mixer", "x_proj"), _MIXER + "x_proj.weight", TRANSPOSE),
    Row(("layers", "mixer", "dt_proj"), _MIXER + "dt_proj.weight", TRANSPOSE),
    Row(("layers", "mixer", "dt_bias"), _MIXER + "dt_proj.bias"),
    Row(("layers", "mixer", "A_log"), _MIXER + "A_log"),
    Row(("layers", "mixer", "D"), _MIXER + "D"),
    Row(("layers", "mixer", "out_proj"), _MIXER + "out_proj.weight", TRANSPOSE),
    Row(("final_norm", "scale"), "backbone.norm_f.weight"),
    Row(("lm_head",), "lm_head.weight", TRANSPOSE, when=lambda cfg: not cfg.tie_embeddings),
)


def mamba_to_hf_config(cfg, *, bos_id: int | None, eos_id: int | None, dtype: str) -> dict[str, Any]:
    """config.json as transformers 5.x writes it for MambaForCausalLM."""
    expand = cfg.inner / cfg.d_model
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.inner,
        "expand": int(expand) if expand.is_integer() else expand,
        "state_size": cfg.ssm_state,
        "num_hidden_layers": cfg.num_layers,
        "conv_kernel": cfg.conv_kernel,
        "time_step_rank": cfg.rank,
        "time_step_min": cfg.dt_min,
        "time_step_max": cfg.dt_max,
        "time_step_floor": cfg.dt_init_floor,
        "time_step_scale": 1.0,
        "time_step_init_scheme": "random",
        "layer_norm_epsilon": cfg.norm_eps,
        "hidden_act": "silu",
        "use_bias": False,
        "use_conv_bias": True,
        "residual_in_fp32": True,
        "rescale_prenorm_residual": False,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": dtype,
    }


def mamba_from_hf_config(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Our `model:` section from a Mamba config.json. Mamba has no position limit;
    `max_seq_len` (what maxllm checks prompts and training rows against) is 2048."""

    def need(key: str) -> Any:
        if key not in hf:
            raise HFError(f"{where}: missing key {key!r}")
        return hf[key]

    for key, allowed in (("hidden_act", "silu"), ("use_bias", False), ("use_conv_bias", True)):
        if hf.get(key, allowed) != allowed:
            raise HFError(f"{where}: {key}={hf[key]!r} is not supported (maxllm's Mamba has {allowed!r})")
    d = need("hidden_size")
    rank = hf.get("time_step_rank", "auto")
    return {
        "family": "mamba",
        "vocab_size": need("vocab_size"),
        "d_model": d,
        "num_layers": need("num_hidden_layers"),
        "ssm_inner": hf.get("intermediate_size") or int(hf.get("expand", 2) * d),
        "ssm_state": hf.get("state_size", 16),
        "conv_kernel": hf.get("conv_kernel", 4),
        "dt_rank": -(-d // 16) if rank == "auto" else int(rank),
        "dt_min": float(hf.get("time_step_min", 0.001)),
        "dt_max": float(hf.get("time_step_max", 0.1)),
        "dt_init_floor": float(hf.get("time_step_floor", 1e-4)),
        "scan_chunk": 64,  # maxllm's own: the training scan's chunk
        "max_seq_len": 2048,
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "init_std": float(hf.get("initializer_range", 0.1)),
    }


MAMBA = Adapter("mamba", "MambaForCausalLM", "mamba", MAMBA_ROWS, mamba_to_hf_config, mamba_from_hf_config)

ADAPTERS: dict[str, Adapter] = {"llama": LLAMA, "mixtral": MIXTRAL, "mamba": MAMBA}


def adapter_for_family(family: str) -> Adapter:
    if family not in ADAPTERS:
        raise HFError(f"model.family={family!r} has no Hugging Face adapter (have: {', '.join(ADAPTERS)})")
    return ADAPTERS[family]


def adapter_for_hf(hf_config: dict[str, Any], where: str) -> Adapter:
    architectures = hf_config.get("architectures") or []
    for adapter in ADAPTERS.values():
        if adapter.architecture in architectures or (not architectures and hf_config.get("model_type") == adapter.model_type):
            return adapter
    have = ", ".join(a.architecture for a in ADAPTERS.values())
    raise HFError(f"{where}: architectures={architectures} (model_type={hf_config.get('model_type')!r}) "
                  f"is not supported; maxllm converts {have}")
