"""Mixture of experts: dispatch against a per-token loop, capacity against dropless,
auxiliary losses against their formulas, sharded training against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxllm.config import MESH_AXES, load_config
from maxllm.metrics import flops_per_token, matmul_params, param_count
from maxllm.models import moe
from maxllm.train import train

from conftest import ROOT, check_export, model_logits, quickstart_prompts

TINY_MOE = ROOT / "tests" / "configs" / "tiny-moe.yml"


def _tiny_moe(*overrides):
    return load_config(TINY_MOE, list(overrides))


def _experts(seed=0, B=3, T=10, D=16, F=24, E=6, K=2):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (B, T, D), jnp.float32)
    router = 0.5 * jax.random.normal(keys[1], (D, E), jnp.float32)
    gate, up = (0.3 * jax.random.normal(k, (E, D, F), jnp.float32) for k in keys[2:4])
    down = 0.3 * jax.random.normal(keys[4], (E, F, D), jnp.float32)
    weights, experts, _, _ = moe.route(x, router, K)
    return x, weights, experts, gate, up, down


def _per_token_loop(x, weights, experts, gate, up, down):
    """Each token through each of its chosen experts, one at a time, in float64."""
    x, weights, experts, gate, up, down = (np.asarray(a, np.float64) for a in (x, weights, experts, gate, up, down))
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for w, e in zip(weights[b, t], experts[b, t].astype(int)):
                g, u = x[b, t] @ gate[e], x[b, t] @ up[e]
                out[b, t] += w * ((g / (1 + np.exp(-g))) * u) @ down[e]
    return out


def test_router_picks_top_k_and_renormalizes():
    x, weights, experts, *_ = _experts()
    np.testing.assert_allclose(np.sum(weights, -1), 1.0, rtol=1e-6)
    assert np.all(np.diff(np.asarray(weights), axis=-1) <= 0)  # best first
    assert np.all(experts[..., 0] != experts[..., 1])


def test_dropless_equals_a_per_token_loop():
    args = _experts()
    got, dropped = moe.dropless_experts(*args)
    np.testing.assert_allclose(got, _per_token_loop(*args), atol=1e-5, rtol=1e-5)
    assert float(dropped) == 0.0


def test_capacity_with_room_for_every_token_equals_dropless():
    args = _experts(seed=1)
    dropless, _ = moe.dropless_experts(*args)
    T, E = args[0].shape[1], args[3].shape[0]
    got, dropped = moe.capacity_experts(*args, slots=T, num_experts=E)
    np.testing.assert_allclose(got, dropless, atol=1e-5, rtol=1e-5)
    assert float(dropped) == 0.0


def test_capacity_drops_what_does_not_fit_first_choices_first():
    x, weights, experts, gate, up, down = _experts(seed=2, B=2, T=12, E=4, K=2)
    slots = 3
    got, dropped = moe.capacity_experts(x, weights, experts, gate, up, down, slots=slots, num_experts=4)
    # Reference: keep an assignment while its expert has room, first choices in token order, then second.
    keep = np.zeros(experts.shape, bool)
    for b in range(2):
        used = np.zeros(4, int)
        for k in range(2):
            for t in range(12):
                e = int(experts[b, t, k])
                if used[e] < slots:
                    used[e] += 1
                    keep[b, t, k] = True
    assert float(dropped) == np.sum(~keep) > 0
    expected = _per_token_loop(x, np.where(keep, weights, 0.0), experts, gate, up, down)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_aux_losses_equal_their_formulas_on_a_hand_computed_case():
    # Two experts, top-1, four tokens and a padding token that must not count.
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1], [0.1, 0.9]], np.float32)
    shift = np.array([1.0, -2.0, 0.5, 3.0, 7.0], np.float32)  # logsumexp(logits) per token
    logits = np.log(probs) + shift[:, None]
    experts = np.argmax(probs, -1)[:, None]
    mask = np.array([1, 1, 1, 1, 0])
    stats = moe.router_stats(jnp.asarray(probs)[None], jnp.asarray(logits)[None], jnp.asarray(experts)[None],
                             jnp.asarray(mask)[None])
    # f = (3/4, 1/4) of the assignments; P = (0.65, 0.35) mean probability.
    assert float(stats["load_balance"]) == pytest.approx(2 * (0.75 * 0.65 + 0.25 * 0.35), rel=1e-6)  # 1.15
    assert float(stats["z"]) == pytest.approx((1 + 4 + 0.25 + 9) / 4, rel=1e-6)
    np.testing.assert_allclose(stats["load"], [0.75, 0.25], rtol=1e-6)


def test_padding_takes_no_capacity_and_gets_no_output():
    x, weights, experts, gate, up, down = _experts(seed=3, B=2, T=16, E=4, K=2)
    # Tokens 10.. are padding (the layer zeroes their router weights). Their first
    # choices come before real tokens' second choices, so if they took slots, the
    # real tokens' results would change.
    padded = weights.at[:, 10:].set(0.0)
    y, dropped = moe.capacity_experts(x, padded, experts, gate, up, down, slots=4, num_experts=4)
    y_short, dropped_short = moe.capacity_experts(x[:, :10], weights[:, :10], experts[:, :10], gate, up, down,
                                                  slots=4, num_experts=4)
    assert np.all(np.asarray(y)[:, 10:] == 0)
    np.testing.assert_allclose(np.asarray(y)[:, :10], y_short, atol=1e-6)
    assert float(dropped) == float(dropped_short) > 0
    y_dropless, _ = moe.dropless_experts(x, padded, experts, gate, up, down)
    assert np.all(np.asarray(y_dropless)[:, 10:] == 0)


def test_aux_losses_join_the_training_loss(tmp_path):
    base = ["train.steps=1", "train.lr=0.0", "train.warmup_steps=0"]
    off = train(_tiny_moe(*base, "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0",
                          f"run.output_dir={tmp_path / 'a'}"))
    on = train(_tiny_moe(*base, "model.moe.aux_loss_coef=10", "model.moe.z_loss_coef=10",
                         f"run.output_dir={tmp_path / 'b'}"))
    m = on.history[1]
    assert m["loss"] == pytest.approx(off.history[1]["loss"], rel=1e-6)  # cross-entropy is reported alone
    assert m["grad_norm"] > off.history[1]["grad_norm"] * 1.5  # but the router is pushed by the aux terms
    assert m["moe_load_balance_loss"] >= 1.0 - 1e-6  # E * sum f P >= 1, equality when balanced
    assert sum(m[f"moe_load/{e}"] for e in range(8)) == pytest.approx(1.0, rel=1e-5)
    assert m["moe_load_max_min"] >= 1.0


def test_flops_count_active_experts_only():
    cfg = _tiny_moe().model  # D=64 N=4 K=2 H=16 F=64 L=2 V=512 E=8 top-2
    attn = 64 * 64 * 2 + 64 * 32 * 2
    assert matmul_params(cfg) == 2 * (attn + 64 * 8 + 2 * 3 * 64 * 64) + 64 * 512
    assert matmul_params(cfg, active=False) == 2 * (attn + 64 * 8 + 8 * 3 * 64 * 64) + 64 * 512
    assert flops_per_token(cfg, 32) == 6 * matmul_params(cfg) + 6 * 2 * 32 * 4 * 16


def test_mixtral_8x7b_has_its_published_size():
    cfg = load_config([ROOT / "configs" / "base.yml", ROOT / "configs" / "models" / "mixtral-8x7b.yml"]).model
    assert param_count(cfg) == 46_702_792_704
    assert param_count(cfg, active=True) == 12_879_925_248


# ---------------------------------------------------------------------------------
# Sharded training equals one device


MESHES = {
    "expert=4": dict(expert=4, fsdp=2),
    "expert=2,tensor=2": dict(expert=2, tensor=2, fsdp=2),
    "fsdp=4": dict(fsdp=4, data=2),
}


def _mesh_overrides(sizes):
    return [f"mesh.{a}={sizes.get(a, 1)}" for a in MESH_AXES]


@pytest.fixture(scope="module", params=["dropless", "capacity"])
def single_device(request, tmp_path_factory):
    mode = request.param
    cfg = _tiny_moe(f"model.moe.dispatch={mode}", f"run.output_dir={tmp_path_factory.mktemp(mode)}")
    return mode, train(cfg, devices=jax.devices()[:1]).history


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_moe_losses_equal_single_device(name, single_device, tmp_path):
    mode, expected = single_device
    result = train(_tiny_moe(f"model.moe.dispatch={mode}", *_mesh_overrides(MESHES[name]),
                             f"run.output_dir={tmp_path}"))
    for step, want in expected.items():
        got = result.history[step]
        for key in ("loss", "grad_norm", "moe_load_balance_loss", "moe_dropped_fraction"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), f"{key} at step {step} on {name} ({mode})"
    gate = result.state["params"]["layers"]["mlp"]["gate"]
    assert gate.sharding.spec[1] == ("expert" if "expert" in name else None)  # (layers, experts, embed, mlp)


# ---------------------------------------------------------------------------------
# Hugging Face: transformers' Mixtral in, ours out


def _hf_mixtral(folder, seed=0):
    """A random tiny MixtralForCausalLM saved by transformers (per-expert tensors on disk)."""
    torch = pytest.importorskip("torch")
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
        num_local_experts=4, num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2,
    )
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at one and the router near uniform: perturb both
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.mul_(20.0)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_transformers_mixtral_imports_with_equalmodel_logits(tmp_path, dispatch):
    torch = pytest.importorskip("torch")
    from maxllm.hf import load_pretrained
    from maxllm.import_hf import import_hf

    hf = _hf_mixtral(tmp_path / "hf")
    tokens = np.random.default_rng(3).integers(0, 96, (2, 17)).astype(np.int32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
    direct = load_pretrained(tmp_path / "hf", [f"model.moe.dispatch={dispatch}"])
    assert direct.config.model.family == "mixtral" and direct.config.model.moe.num_experts == 4
    diff = np.abs(model_logits(direct, tokens) - theirs).max()
    print(f"\nMixtral import ({dispatch}): max |logit difference| vs transformers {diff:.2e}")
    assert diff <= 1e-4, diff
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    assert np.abs(model_logits(load_pretrained(run, [f"model.moe.dispatch={dispatch}"]), tokens) - theirs).max() <= 1e-4


TINY_MOE_SECTION = ("{num_experts: 8, top_k: 2, dispatch: capacity, capacity_factor: 1.25, "
                    "aux_loss_coef: 0.01, z_loss_coef: 0.001}")


def _train_moe_on_quickstart(out, *overrides):
    from conftest import train_on_quickstart

    return train_on_quickstart(out, "model.family=mixtral", f"model.moe={TINY_MOE_SECTION}",
                               "model.max_seq_len=128", "model.tie_embeddings=false", *overrides)


def test_tiny_moe_learns_the_quickstart_text_and_reports_expert_load(tmp_path):
    result = _train_moe_on_quickstart(tmp_path, "train.steps=100", "train.lr=5e-3", "train.global_batch_size=16",
                                      "checkpoint.enabled=false", "logging.every_steps=10")
    history = result.history
    first, last = history[min(history)], history[max(history)]
    ratio = last["moe_load_max_min"]
    print(f"\ntiny MoE on quickstart text: loss {first['loss']:.3f} -> {last['loss']:.3f} in {max(history)} steps; "
          f"expert load max/min {ratio:.2f} (worst layer), dropped {last['moe_dropped_fraction']:.1%}; "
          f"mean load per expert {[round(last[f'moe_load/{e}'], 3) for e in range(8)]}")
    assert last["loss"] < first["loss"] - 1.5
    assert ratio >= 1.0 and 0.0 <= last["moe_dropped_fraction"] < 1.0


@pytest.fixture(scope="module")
def trained_moe(tmp_path_factory):
    """A tiny MoE trained a few steps on the quickstart shards, from a wide
    initialization so that its greedy continuations vary."""
    out = tmp_path_factory.mktemp("moe")
    result = _train_moe_on_quickstart(out, "train.steps=6", "train.lr=3e-3", "checkpoint.every_steps=3",
                                      "model.init_std=0.3")
    return out, result


def test_trained_moe_exports_and_transformers_generates_the_same(trained_moe, tmp_path):
    pytest.importorskip("torch")
    run, _ = trained_moe
    prompt = quickstart_prompts("To create a table in PostgreSQL, use")[0]
    check_export(run, tmp_path / "hf", prompt, "MixtralForCausalLM", "trained tiny MoE")


def test_the_serving_engine_decodes_the_moe_like_offline_greedy(trained_moe):
    """Requests prefilled together (padded to one length: padding must not route)
    decode as each does alone offline; int8 weights serve too."""
    from maxllm.sample import greedy_generate
    from maxllm.serve.engine import Request, SamplingParams
    from maxllm.serve.loader import load_engine
    from maxllm.serve.quantize import weight_bytes

    run, _ = trained_moe
    engine, tokenizer, cfg, _ = load_engine(run, dtype="float32", slots=4, max_total_tokens=64, warmup=False)
    assert cfg.model.family == "mixtral"
    prompts = quickstart_prompts("The function returns", "To create a table in PostgreSQL, use the",
                                 "In Django, a model is a class that")
    results = {}
    for i, prompt in enumerate(prompts):
        engine.submit(Request(prompt, SamplingParams(max_new_tokens=10), on_done=lambda r, i=i: results.update({i: r})))
    engine._admit()  # one batched prefill of three lengths
    while engine.busy_slots:
        engine._generate()
    for i, prompt in enumerate(prompts):
        expected = greedy_generate(engine.graphdef, engine.params, [prompt], 10, 64, tokenizer.eos_id)[0]
        assert [t.id for t in results[i].tokens] == expected[:len(results[i].tokens)] and results[i].tokens

    int8, _, _, _ = load_engine(run, dtype="bfloat16", quantize="int8", slots=2, max_total_tokens=64, warmup=False)
    bf16, _, _, _ = load_engine(run, dtype="bfloat16", slots=2, max_total_tokens=64, warmup=False)
    assert weight_bytes(int8.params) < 0.6 * weight_bytes(bf16.params)
    int8.start()
    try:
        assert len(int8.generate(prompts[0], SamplingParams(max_new_tokens=5)).tokens) == 5
    finally:
        int8.stop()
