"""Context parallelism (rows split over the sequence axis) and the splash kernel
equal the single-device, dense-attention reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxllm.config import MESH_AXES
from maxllm.mesh import activation_rules, make_mesh
from maxllm.metrics import flops_per_token, matmul_params
from maxllm.models.attention import AttentionMask, attention
from maxllm.models.context import context_attention, load_balanced_order
from maxllm.train import train


def _packed_rows(B: int, T: int, cut: int):
    """Two documents per row (lengths cut and T - cut), as packing makes them."""
    seg = np.concatenate([np.ones((B, cut)), 2 * np.ones((B, T - cut))], axis=1).astype(np.int32)
    pos = np.concatenate([np.arange(cut), np.arange(T - cut)])[None].repeat(B, 0).astype(np.int32)
    return jnp.asarray(seg), jnp.asarray(pos)


def _qkv(B, T, N, K, H):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, T, K, H)),
            jax.random.normal(kv, (B, T, K, H)))


def _value_and_grads(fn, q, k, v):
    """The output and the gradients of a scalar that weighs every output entry differently."""
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731
    return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def test_load_balanced_order_gives_each_shard_an_early_and_a_late_chunk():
    order = load_balanced_order(16, 4)
    assert sorted(order) == list(range(16))
    shards = order.reshape(4, 4)
    assert shards[0].tolist() == [0, 1, 14, 15] and shards[3].tolist() == [6, 7, 8, 9]
    # Under a causal mask every shard's queries see the same number of keys.
    visible = [(shard + 1).sum() for shard in shards]
    assert len(set(visible)) == 1, visible
    with pytest.raises(ValueError, match="2 x 4"):
        load_balanced_order(20, 4)


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
def test_context_attention_equals_dense_attention(strategy, tiny):
    """sequence=4 x fsdp=2, rows in the load-balanced order, two documents per row
    (the second starting inside a device's chunk): output and gradients equal the
    dense single-device attention of the same tokens."""
    cfg = tiny("mesh.fsdp=2", "mesh.sequence=4")
    mesh = make_mesh(cfg.mesh)
    B, T, N, K, H = 2, 64, 4, 2, 16
    q, k, v = _qkv(B, T, N, K, H)
    seg, pos = _packed_rows(B, T, cut=37)
    order = load_balanced_order(T, 4)

    def dense(q, k, v):
        return attention(q, k, v, AttentionMask(seg, pos, seg, pos, True))[:, order]

    def split(q, k, v):
        with activation_rules(cfg.mesh.rules.activations, mesh):
            return context_attention(q[:, order], k[:, order], v[:, order], seg[:, order], pos[:, order],
                                     strategy, "xla")

    want, want_grads = _value_and_grads(dense, q, k, v)
    with jax.set_mesh(mesh):
        got, got_grads = _value_and_grads(split, q, k, v)
    np.testing.assert_allclose(got, want, atol=2e-6)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=2e-5, err_msg=f"d/d{name}")


@pytest.fixture(scope="module")
def long_rows_single_device(tmp_path_factory):
    """The tiny model on rows of 1024 tokens, where attention is most of the work."""
    from maxllm.config import load_config

    from conftest import TINY

    cfg = load_config(TINY, _long_rows(tmp_path_factory.mktemp("single"), {}))
    attention_share = 1 - 6 * matmul_params(cfg.model) / flops_per_token(cfg.model, cfg.data.seq_len)
    print(f"\nseq_len {cfg.data.seq_len}: attention is {attention_share:.0%} of the model FLOPs")
    assert attention_share > 0.5
    return train(cfg, devices=jax.devices()[:1]).history


def _long_rows(out, mesh: dict, *extra: str) -> list[str]:
    return [f"run.output_dir={out}", "data.seq_len=1024", "model.max_seq_len=1024",
            *(f"mesh.{a}={mesh.get(a, 1)}" for a in MESH_AXES), *extra]


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
def test_context_parallel_training_equals_single_device(strategy, tiny, tmp_path, long_rows_single_device):
    cfg = tiny(*_long_rows(tmp_path, dict(sequence=4, fsdp=2), f"model.context_parallel={strategy}"))
    history = train(cfg).history
    print(f"\nsequence=4 ({strategy}) vs one device:")
    for step, expected in long_rows_single_device.items():
        got = history[step]
        print(f"  step {step}: loss {got['loss']:.6f} vs {expected['loss']:.6f}, "
              f"grad norm {got['grad_norm']:.6f} vs {expected['grad_norm']:.6f}")
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), f"step {step}"
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5), f"step {step}"


def test_context_parallel_needs_rows_that_split_into_chunks(tiny, tmp_path):
    from maxllm.mesh import ShardingError

    cfg = tiny(f"run.output_dir={tmp_path}", "mesh.sequence=4", "mesh.fsdp=2", "data.seq_len=36")
    with pytest.raises(ShardingError, match="data.seq_len=36 must be a multiple of 2 x mesh.sequence"):
        train(cfg)


@pytest.mark.parametrize("length", [256, 1024])
def test_splash_attention_equals_xla(length):
    """The Pallas TPU kernel, interpreted on the CPU: packed rows, GQA; at 1024
    tokens the kernel works in 512-token blocks, skipping those above the diagonal."""
    B, N, K, H = 2, 4, 2, 64
    q, k, v = _qkv(B, length, N, K, H)
    seg, pos = _packed_rows(B, length, cut=length * 5 // 8)
    mask = AttentionMask(seg, pos, seg, pos, True)
    want, want_grads = _value_and_grads(lambda q, k, v: attention(q, k, v, mask, "xla"), q, k, v)
    got, got_grads = _value_and_grads(lambda q, k, v: attention(q, k, v, mask, "splash"), q, k, v)
    print(f"\nsplash vs xla at {length} tokens: output {float(jnp.max(jnp.abs(got - want))):.2e}, gradients "
          + ", ".join(f"d{n} {float(jnp.max(jnp.abs(g - w))):.2e}" for n, g, w in zip("qkv", got_grads, want_grads)))
    np.testing.assert_allclose(got, want, atol=2e-6)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-5, err_msg=f"d/d{name}")


def test_splash_training_on_a_mesh_equals_xla(tiny, tmp_path):
    """attention=splash in the model, fsdp=4 x tensor=2: the kernel runs per device
    on its rows and heads, and the losses are the xla backend's."""
    common = ["mesh.fsdp=4", "mesh.tensor=2", "data.seq_len=128", "train.steps=3"]
    xla = train(tiny(*common, f"run.output_dir={tmp_path / 'xla'}")).history
    splash = train(tiny(*common, "model.attention=splash", f"run.output_dir={tmp_path / 'splash'}")).history
    for step in xla:
        assert splash[step]["loss"] == pytest.approx(xla[step]["loss"], rel=1e-5), f"step {step}"
        assert splash[step]["grad_norm"] == pytest.approx(xla[step]["grad_norm"], rel=1e-5), f"step {step}"


# ---------------------------------------------------------------------------------
# Pipeline parallelism

PIPELINES = {
    "stage=2,M=4": dict(stage=2, fsdp=4, microbatches=4),
    "stage=2,M=8": dict(stage=2, fsdp=4, microbatches=8),
    "stage=4,M=4": dict(stage=4, fsdp=2, microbatches=4),
    "stage=4,M=8": dict(stage=4, fsdp=2, microbatches=8),
    "stage=4,M=8,circular R=2": dict(stage=4, fsdp=2, microbatches=8, repeats=2),
    "stage=2,fsdp=2,tensor=2,M=4": dict(stage=2, fsdp=2, tensor=2, microbatches=4),
}


def _deep(out, layout: dict) -> list[str]:
    """The tiny model with 8 layers (they split into 2 or 4 stages, and 4 x 2 chunks)."""
    return [f"run.output_dir={out}", "model.num_layers=8", "train.global_batch_size=32",
            *(f"mesh.{a}={layout.get(a, 1)}" for a in MESH_AXES),
            f"train.microbatches={layout.get('microbatches')}", f"train.pipeline_repeats={layout.get('repeats', 1)}"]


@pytest.fixture(scope="module")
def deep_single_device(tmp_path_factory):
    from maxllm.config import load_config

    from conftest import TINY

    cfg = load_config(TINY, _deep(tmp_path_factory.mktemp("single"), {"microbatches": "null"}))
    return train(cfg, devices=jax.devices()[:1]).history


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_losses_equal_single_device(name, tiny, tmp_path, deep_single_device):
    result = train(tiny(*_deep(tmp_path, PIPELINES[name])))
    print(f"\n{name} vs one device: " + ", ".join(
        f"{result.history[s]['loss']:.6f}/{deep_single_device[s]['loss']:.6f}" for s in deep_single_device))
    for step, expected in deep_single_device.items():
        got = result.history[step]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), f"step {step}"
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5), f"step {step}"
    # The stack is split over the stages: each holds L/S layers of every parameter.
    wq = result.state["params"]["layers"]["attn"]["wq"]
    assert wq.sharding.spec[0] == "stage"
    assert wq.sharding.shard_shape(wq.shape)[0] == 8 // PIPELINES[name]["stage"]


@pytest.mark.parametrize("overrides, message", [
    (["model.num_layers=6", "mesh.stage=4", "mesh.fsdp=2"], "num_layers=6 does not split into mesh.stage=4"),
    (["model.num_layers=8", "mesh.stage=4", "mesh.fsdp=2", "train.microbatches=2", "train.pipeline_repeats=2"],
     "needs train.microbatches >= mesh.stage"),
    (["model.num_layers=8", "mesh.stage=2", "mesh.fsdp=4", "train.microbatches=3"],
     "do not split into train.microbatches=3"),
])
def test_pipeline_layout_errors_name_the_keys(overrides, message, tiny, tmp_path):
    from maxllm.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        train(tiny(f"run.output_dir={tmp_path}", "train.global_batch_size=32", *overrides))
