import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxllm.optim import build_optimizer, decay_mask, learning_rate_schedule
from maxllm.train import token_loss_sums


def test_weight_decay_spares_norms_and_biases(tiny):
    cfg = tiny("train.weight_decay=0.5", "train.lr=0.1", "train.warmup_steps=0", "train.clip_grad_norm=null").train
    params = {
        "layers": {"attn_norm": {"scale": jnp.ones((2, 4))}, "attn": {"wq": jnp.ones((2, 4, 4))}},
        "proj": {"bias": jnp.ones(4)},
    }
    assert decay_mask(params) == {
        "layers": {"attn_norm": {"scale": False}, "attn": {"wq": True}},
        "proj": {"bias": False},
    }
    tx = build_optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["layers"]["attn_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(new["proj"]["bias"], 1.0)
    np.testing.assert_allclose(new["layers"]["attn"]["wq"], 1 - 0.1 * 0.5)


def test_clipping_is_part_of_the_optimizer(tiny):
    """Adam is scale-invariant per step, so clipping shows on the second step: a
    large first gradient clipped to norm 1 leaves smaller moments behind."""
    params = {"w": jnp.ones(4)}
    grads = [{"w": jnp.array([10.0, -10.0, 10.0, 10.0])}, {"w": jnp.array([1.0, 2.0, -1.0, 0.5])}]

    def second_update(clip):
        tx = build_optimizer(tiny(f"train.clip_grad_norm={clip}", "train.warmup_steps=0").train)
        state = tx.init(params)
        for g in grads:
            update, state = tx.update(g, state, params)
        return np.asarray(update["w"])

    clipped, unclipped = second_update(1.0), second_update("null")
    assert not np.allclose(clipped, unclipped)
    # With clipping, both steps are norm-1 gradients; check against optax directly.
    ref = optax.adamw(1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    state = ref.init(params)
    for g in grads:
        g = jax.tree.map(lambda x: x / max(1.0, float(optax.tree.norm(g))), g)
        update, state = ref.update(g, state, params)
    lr = float(learning_rate_schedule(tiny("train.warmup_steps=0").train)(1))
    np.testing.assert_allclose(clipped, lr * np.asarray(update["w"]), rtol=1e-5)


def test_schedules(tiny):
    common = ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1"]
    cosine = learning_rate_schedule(tiny(*common, "train.schedule=cosine").train)
    assert float(cosine(0)) == 0.0
    assert float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(55)) == pytest.approx(0.55, abs=1e-3)  # halfway down the cosine
    assert float(cosine(100)) == pytest.approx(0.1)

    wsd = learning_rate_schedule(tiny(*common, "train.schedule=wsd", "train.decay_fraction=0.2").train)
    assert float(wsd(10)) == pytest.approx(1.0)
    assert float(wsd(79)) == pytest.approx(1.0)
    assert float(wsd(90)) == pytest.approx(0.55)
    assert float(wsd(100)) == pytest.approx(0.1)

    constant = learning_rate_schedule(tiny(*common, "train.schedule=constant").train)
    assert float(constant(5)) == pytest.approx(0.5)
    assert [float(constant(s)) for s in (10, 50, 100)] == pytest.approx([1.0, 1.0, 1.0])


def test_token_loss_sums_by_hand():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 3))
    mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    total, nll, count = token_loss_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), 1e-2)
    lse = np.log(np.exp(logits).sum(-1))
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    expected_nll = ((lse - picked) * mask).sum()
    assert float(count) == 4
    np.testing.assert_allclose(float(nll), expected_nll, rtol=1e-6)
    np.testing.assert_allclose(float(total), expected_nll + 1e-2 * (lse**2 * mask).sum(), rtol=1e-6)
