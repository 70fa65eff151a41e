"""The dense model: scanned equals unrolled, causality by gradients, packed segments
isolated, decode cache equals the full forward, and parity with transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxllm.models import build_model
from maxllm.models.attention import AttentionMask, _flash, _xla
from maxllm.models.layers import REMAT_POLICIES

jax.config.update("jax_default_matmul_precision", "highest")


def _model(cfg):
    return build_model(cfg.model, seed=0)


def _positions(B, T):
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _tokens(B, T, vocab, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)), jnp.int32)


def _loss_and_grads(model, tokens, positions):
    graphdef, params = nnx.split(model)

    def loss(params):
        logits, _, _ = nnx.merge(graphdef, params)(tokens, positions)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_equals_unrolled(tiny, remat):
    tokens, positions = _tokens(2, 16, 512), _positions(2, 16)
    scanned = _model(tiny(f"model.remat={remat}", "model.scan_layers=true"))
    unrolled = _model(tiny(f"model.remat={remat}", "model.scan_layers=false"))
    l1, _, _ = scanned(tokens, positions)
    l2, _, _ = unrolled(tokens, positions)
    np.testing.assert_allclose(l1, l2, rtol=1e-6, atol=1e-6)
    (v1, g1), (v2, g2) = _loss_and_grads(scanned, tokens, positions), _loss_and_grads(unrolled, tokens, positions)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_remat_policies_leave_gradients_unchanged(tiny, policy):
    tokens, positions = _tokens(2, 16, 512), _positions(2, 16)
    (v0, g0) = _loss_and_grads(_model(tiny("model.remat=none")), tokens, positions)
    (v1, g1) = _loss_and_grads(_model(tiny(f"model.remat={policy}")), tokens, positions)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_causality_by_gradients(tiny):
    """d logits[t] / d input embedding at s is zero for every s > t and not for s <= t."""
    T = 12
    model = _model(tiny())
    tokens = jnp.arange(T, dtype=jnp.int32)[None]  # distinct ids: table row s is position s
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)

    def logits_at(table, t):
        with_table = {**params, "embed": {"table": table}}
        logits, _, _ = nnx.merge(graphdef, with_table)(tokens, _positions(1, T))
        return jnp.sum(logits[0, t] ** 2)

    table = params["embed"]["table"]
    for t in range(T):
        grad = jax.grad(logits_at)(table, t)
        per_position = np.abs(np.asarray(grad[:T])).sum(axis=1)
        assert np.all(per_position[t + 1 :] == 0), f"position {t} sees the future"
        assert np.all(per_position[: t + 1] > 0), f"position {t} does not see its past"


def test_packed_segments_equal_separate_rows(tiny):
    model = _model(tiny())
    a, b = _tokens(1, 7, 512, seed=2), _tokens(1, 9, 512, seed=3)
    packed = jnp.concatenate([a, b], axis=1)
    positions = jnp.concatenate([_positions(1, 7), _positions(1, 9)], axis=1)
    segments = jnp.asarray([[1] * 7 + [2] * 9], jnp.int32)
    logits, _, _ = model(packed, positions, segments)
    alone_a, _, _ = model(a, _positions(1, 7))
    alone_b, _, _ = model(b, _positions(1, 9))
    np.testing.assert_allclose(logits[:, :7], alone_a, atol=1e-5)
    np.testing.assert_allclose(logits[:, 7:], alone_b, atol=1e-5)
    # And the mask matters: without segment ids, b's logits change.
    unpacked, _, _ = model(packed, positions)
    assert np.abs(np.asarray(unpacked[:, 7:] - alone_b)).max() > 1e-3


def test_flash_path_masks_like_reference():
    """The cudnn backend's arguments (is_causal + segment mask, or a dense mask for
    a cache) give the reference result through jax.nn.dot_product_attention's XLA path."""
    rng = np.random.default_rng(0)
    B, T, N, K, H = 2, 10, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(B, T, N, H), (B, T, K, H), (B, T, K, H)])
    seg = jnp.asarray([[1] * 4 + [2] * 6, [1] * 10], jnp.int32)
    pos = jnp.asarray([list(range(4)) + list(range(6)), list(range(10))], jnp.int32)
    for self_attention in (True, False):
        mask = AttentionMask(seg, pos, seg, pos, self_attention)
        np.testing.assert_allclose(_flash(q, k, v, mask, "xla"), _xla(q, k, v, mask), atol=1e-5)


def test_decode_with_cache_equals_full_forward(tiny):
    """Right-padded prefill of rows with different lengths, then one token at a time."""
    model = _model(tiny())
    B, T, P = 2, 14, 8
    tokens = _tokens(B, T, 512)
    full, _, _ = model(tokens, _positions(B, T))
    lengths = [5, 8]
    prompt = np.zeros((B, P), np.int32)
    seg = np.zeros((B, P), np.int32)
    for i, n in enumerate(lengths):
        prompt[i, :n], seg[i, :n] = tokens[i, :n], 1
    cache = model.init_cache(B, 32)
    logits, cache, _ = model(jnp.asarray(prompt), _positions(B, P), jnp.asarray(seg), cache)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(logits[i, :n], full[i, :n], atol=1e-5)
    np.testing.assert_array_equal(cache["index"], lengths)
    steps = T - max(lengths)
    for s in range(steps):
        idx = np.asarray(cache["index"])
        nxt = jnp.asarray([[tokens[i, idx[i]]] for i in range(B)], jnp.int32)
        logits, cache, _ = model(nxt, jnp.asarray(idx)[:, None], jnp.ones((B, 1), jnp.int32), cache)
        for i in range(B):
            np.testing.assert_allclose(logits[i, 0], full[i, idx[i]], atol=1e-5)


def test_llama3_rope_scaling_matches_transformers():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from maxllm.config import LlamaRopeScaling
    from maxllm.models.layers import rope_inv_freq

    params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    hf = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **params})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours = rope_inv_freq(64, 500000.0, LlamaRopeScaling(type="llama3", **params))
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
    assert not np.allclose(ours, rope_inv_freq(64, 500000.0)), "scaling changed nothing"


def _to_hf_state_dict(cfg, params):
    """Our parameter tree as LlamaForCausalLM's state dict (numpy)."""
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    p = jax.tree.map(np.asarray, params)
    sd = {"model.embed_tokens.weight": p["embed"]["table"], "model.norm.weight": p["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = p["lm_head"].T
    layers = p["layers"]
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        sd[pre + "self_attn.q_proj.weight"] = layers["attn"]["wq"][i].reshape(D, N * H).T
        sd[pre + "self_attn.k_proj.weight"] = layers["attn"]["wk"][i].reshape(D, K * H).T
        sd[pre + "self_attn.v_proj.weight"] = layers["attn"]["wv"][i].reshape(D, K * H).T
        sd[pre + "self_attn.o_proj.weight"] = layers["attn"]["wo"][i].reshape(N * H, D).T
        sd[pre + "mlp.gate_proj.weight"] = layers["mlp"]["gate"][i].T
        sd[pre + "mlp.up_proj.weight"] = layers["mlp"]["up"][i].T
        sd[pre + "mlp.down_proj.weight"] = layers["mlp"]["down"][i].T
        sd[pre + "input_layernorm.weight"] = layers["attn_norm"]["scale"][i]
        sd[pre + "post_attention_layernorm.weight"] = layers["mlp_norm"]["scale"][i]
    return sd


@pytest.mark.parametrize("tied, scaling", [(False, False), (True, True)])
def test_logits_match_transformers_llama(tiny, tied, scaling):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    overrides = [f"model.tie_embeddings={str(tied).lower()}", "model.rope_theta=500000.0"]
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if scaling:
        params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
        overrides.append("model.rope_scaling={type: llama3, factor: 8.0, low_freq_factor: 1.0, "
                         "high_freq_factor: 4.0, original_max_position_embeddings: 16}")
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, **params}
    cfg = tiny(*overrides).model
    model = build_model(cfg, seed=0)
    # Norm scales start at one; perturb them so a swapped norm would show.
    _, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    for norm in ("attn_norm", "mlp_norm"):
        params["layers"][norm]["scale"] = 1 + 0.1 * jax.random.normal(jax.random.key(5), params["layers"][norm]["scale"].shape)
    model = nnx.merge(nnx.graphdef(model), params)

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_size, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope, attn_implementation="eager",
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in _to_hf_state_dict(cfg, params).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)

    tokens = _tokens(2, 24, cfg.vocab_size)
    ours, _, _ = model(tokens, _positions(2, 24))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(np.array(tokens)).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5, rtol=1e-5)


def test_greedy_generate_with_fsdp_sharded_params_equals_one_device(tiny):
    """Many prompts and steps with parameters sharded over 8 CPU devices: the same
    tokens as on one device (and no collective deadlock: with dozens of decode
    steps queued at once, XLA's CPU collectives used to hang here)."""
    from maxllm.mesh import make_mesh, param_shardings
    from maxllm.sample import greedy_generate

    cfg = tiny("mesh.fsdp=8")
    graphdef, state = nnx.split(_model(cfg))
    params = nnx.to_pure_dict(state)
    mesh = make_mesh(cfg.mesh)
    sharded = jax.device_put(params, param_shardings(state, cfg.mesh.rules.params, mesh))
    prompts = [list(range(3 + i % 5, 40 + i % 7)) for i in range(64)]
    got = greedy_generate(graphdef, sharded, prompts, 80, cfg.model.max_seq_len)
    want = greedy_generate(graphdef, jax.device_put(params, jax.devices()[0]), prompts, 80, cfg.model.max_seq_len)
    assert got == want
