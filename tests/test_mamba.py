"""Mamba: the chunked scan against the recurrence, decoding against the full
forward, packing, sharding, and transformers' MambaForCausalLM both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxllm.config import MESH_AXES, load_config
from maxllm.models import build_model
from maxllm.models.mamba import selective_scan
from maxllm.train import train

from conftest import ROOT, check_export, model_logits, quickstart_prompts

TINY_MAMBA = ROOT / "tests" / "configs" / "tiny-mamba.yml"


def _cfg(*overrides):
    return load_config(TINY_MAMBA, list(overrides))


def _scan_inputs(B=2, T=37, I=6, G=4, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    delta = jax.nn.softplus(jax.random.normal(k[0], (B, T, I)) - 1.0)
    A = -jnp.exp(jax.random.normal(k[1], (I, G)) * 0.5)
    b, c = jax.random.normal(k[2], (B, T, G)), jax.random.normal(k[3], (B, T, G))
    u = jax.random.normal(k[4], (B, T, I))
    keep = jax.random.uniform(k[5], (B, T)) > 0.1  # some segment starts
    return delta, A, b, c, u, keep


def _sequential(delta, A, b, c, u, keep):
    """The recurrence, one token per lax.scan step (float32, differentiable)."""

    def step(h, xs):
        d, bb, cc, uu, kk = xs
        h = kk[:, None, None] * jnp.exp(d[..., None] * A) * h + (d * uu)[..., None] * bb[:, None, :]
        return h, jnp.einsum("big,bg->bi", h, cc)

    h0 = jnp.zeros((delta.shape[0], delta.shape[2], A.shape[1]))
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (delta, b, c, u, keep.astype(jnp.float32)))
    h, y = jax.lax.scan(step, h0, xs)
    return jnp.swapaxes(y, 0, 1), h


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 64])
def test_chunked_scan_equals_the_recurrence_and_so_do_gradients(chunk):
    args = _scan_inputs()
    y_ref, h_ref = _sequential(*args)
    y, h = selective_scan(*args, None, chunk)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)

    weights = jax.random.normal(jax.random.key(9), y_ref.shape)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a)[0] * weights)  # noqa: E731
    grads = jax.grad(loss(lambda *a: selective_scan(*a, None, chunk)), argnums=(0, 1, 2, 3, 4))(*args)
    grads_ref = jax.grad(loss(_sequential), argnums=(0, 1, 2, 3, 4))(*args)
    for g, r in zip(grads, grads_ref):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-5)


def _model(*overrides):
    cfg = _cfg(*overrides).model
    return build_model(cfg, 0), cfg


def test_step_by_step_decoding_equals_the_full_forward():
    model, cfg = _model()
    tokens = jax.random.randint(jax.random.key(1), (2, 29), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(29), tokens.shape)
    full, _, _ = model(tokens, positions)
    cache = model.init_cache(2, 64)
    prefill, cache, _ = model(tokens[:, :11], positions[:, :11], cache=cache)
    steps = [prefill]
    for t in range(11, 29):
        logits, cache, _ = model(tokens[:, t : t + 1], positions[:, t : t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)
    assert np.asarray(cache["index"]).tolist() == [29, 29]


def test_a_right_padded_prefill_leaves_the_state_of_its_last_real_token():
    model, cfg = _model()
    tokens = jax.random.randint(jax.random.key(2), (1, 9), 0, cfg.vocab_size)
    padded = jnp.concatenate([tokens, jnp.zeros((1, 7), tokens.dtype)], axis=1)
    segments = jnp.concatenate([jnp.ones((1, 9), jnp.int32), jnp.zeros((1, 7), jnp.int32)], axis=1)
    _, exact, _ = model(tokens, jnp.arange(9)[None], cache=model.init_cache(1, 32))
    _, after_pad, _ = model(padded, jnp.arange(16)[None], segments, cache=model.init_cache(1, 32))
    for key in ("conv", "ssm"):
        for a, b in zip(exact[key], after_pad[key]):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_packed_row_equals_its_segments_run_separately():
    model, cfg = _model()
    lengths = [13, 5, 14]
    tokens = jax.random.randint(jax.random.key(3), (1, sum(lengths)), 0, cfg.vocab_size)
    segments = jnp.concatenate([jnp.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
    positions = jnp.concatenate([jnp.arange(n) for n in lengths])[None]
    packed, _, _ = model(tokens, positions, segments)
    start = 0
    for n in lengths:
        alone, _, _ = model(tokens[:, start : start + n], jnp.arange(n)[None])
        np.testing.assert_allclose(packed[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    return train(_cfg(f"run.output_dir={tmp_path_factory.mktemp('single')}"), devices=jax.devices()[:1]).history


def test_sharded_tensor2_fsdp4_equals_single_device(single_device_losses, tmp_path):
    sizes = dict(tensor=2, fsdp=4)
    result = train(_cfg(*[f"mesh.{a}={sizes.get(a, 1)}" for a in MESH_AXES], f"run.output_dir={tmp_path}"))
    for step, want in single_device_losses.items():
        for key in ("loss", "grad_norm"):
            assert result.history[step][key] == pytest.approx(want[key], rel=1e-5), f"{key} at step {step}"
    in_proj = result.state["params"]["layers"]["mixer"]["in_proj"]  # (layers, D, 2, I)
    assert in_proj.sharding.spec[1] == "fsdp" and in_proj.sharding.spec[3] == "tensor"


# ---------------------------------------------------------------------------------
# Hugging Face


def _hf_mamba(folder, seed=0):
    torch = pytest.importorskip("torch")
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    cfg = MambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                      layer_norm_epsilon=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def test_transformers_mamba_imports_with_equalmodel_logits(tmp_path):
    torch = pytest.importorskip("torch")
    from maxllm.hf import load_pretrained
    from maxllm.import_hf import import_hf

    hf = _hf_mamba(tmp_path / "hf")
    tokens = np.random.default_rng(4).integers(0, 96, (2, 23)).astype(np.int32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
    direct = load_pretrained(tmp_path / "hf", ["model.dtype=float32"])
    assert direct.config.model.family == "mamba" and direct.config.model.inner == 64
    diff = np.abs(model_logits(direct, tokens) - theirs).max()
    print(f"\nMamba import: max |logit difference| vs transformers (slow path) {diff:.2e}")
    assert diff <= 1e-4, diff
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    assert np.abs(model_logits(load_pretrained(run, ["model.dtype=float32"]), tokens) - theirs).max() <= 1e-4


@pytest.fixture(scope="module")
def trained_mamba(tmp_path_factory):
    """A tiny Mamba trained a few steps on the quickstart shards, from a wide
    initialization so that its greedy continuations vary."""
    from conftest import QUICKSTART

    run = tmp_path_factory.mktemp("mamba")
    train(load_config(TINY_MAMBA, [
        f"run.output_dir={run}", "data.source=tokens", f"data.path={QUICKSTART / 'tokens' / 'valid'}",
        "model.vocab_size=4096", "checkpoint.enabled=true", "train.steps=6", "train.lr=3e-3",
        "model.init_std=0.3", "model.max_seq_len=128",
    ]))
    return run


def _prompts():
    return quickstart_prompts("To create a table in PostgreSQL, use", "The function returns",
                              "In Django, a model is a class that")


def test_trained_mamba_exports_loads_in_transformers_and_generates_the_same(trained_mamba, tmp_path):
    pytest.importorskip("torch")
    check_export(trained_mamba, tmp_path / "hf", _prompts()[0], "MambaForCausalLM", "trained tiny Mamba")


def test_the_serving_engine_decodes_mamba_like_offline_greedy(trained_mamba):
    """Prompts of three lengths prefilled together (right-padded) then decoded in
    the engine's slots give each prompt's offline greedy continuation."""
    from maxllm.sample import greedy_generate
    from maxllm.serve.engine import Request, SamplingParams
    from maxllm.serve.loader import load_engine

    engine, tokenizer, cfg, _ = load_engine(trained_mamba, dtype="float32", slots=4, max_total_tokens=64,
                                            warmup=False)
    assert cfg.model.family == "mamba"
    results = {}
    for i, prompt in enumerate(_prompts()):
        engine.submit(Request(prompt, SamplingParams(max_new_tokens=10), on_done=lambda r, i=i: results.update({i: r})))
    engine._admit()
    while engine.busy_slots:
        engine._generate()
    for i, prompt in enumerate(_prompts()):
        expected = greedy_generate(engine.graphdef, engine.params, [prompt], 10, 64, tokenizer.eos_id)[0]
        assert [t.id for t in results[i].tokens] == expected[:len(results[i].tokens)] and results[i].tokens


def test_the_training_scan_never_holds_the_whole_sequence_state():
    """Forward and backward over T=256 in chunks of 16: no (B, T, I, G) array in
    the compiled program, only (B, 16, I, G) chunks."""
    B, T, I, G = 2, 256, 6, 4
    args = _scan_inputs(B=B, T=T, I=I, G=G)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(selective_scan(*a, None, 16)[0]), argnums=(0, 2, 4)))
    hlo = grad.lower(*args).compile().as_text()
    assert f"f32[{B},16,{I},{G}]" in hlo
    assert f"f32[{B},{T},{I},{G}]" not in hlo and f"f32[16,{B},16,{I},{G}]" not in hlo
