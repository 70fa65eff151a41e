import json
from types import SimpleNamespace

import jax
import pytest
from flax import nnx

from maxllm.config import load_config
from maxllm.metrics import flops_per_token, matmul_params, param_count, peak_flops
from maxllm.models import build_model
from maxllm.train import train

from conftest import ROOT

PRESETS = sorted(p.stem for p in (ROOT / "configs" / "models").glob("*.yml"))


def _preset(name):
    return load_config([ROOT / "configs" / "base.yml", ROOT / "configs" / "models" / f"{name}.yml"]).model


@pytest.mark.parametrize("name", PRESETS)
def test_param_count_formula_matches_the_built_model(name):
    cfg = _preset(name)
    abstract = nnx.eval_shape(lambda: build_model(cfg, seed=0))
    actual = sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(abstract))))
    assert param_count(cfg) == actual


def test_published_shapes_have_their_published_sizes():
    assert param_count(_preset("llama3.2-1b")) == 1_235_814_400
    assert param_count(_preset("llama3.1-8b")) == 8_030_261_248
    assert param_count(_preset("smollm-135m")) == 134_515_008


def test_flops_formula_by_hand(tiny):
    cfg = tiny().model  # D=64 N=4 K=2 H=16 F=128 L=2 V=512
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128
    assert matmul_params(cfg) == 2 * per_layer + 64 * 512
    assert flops_per_token(cfg, 32) == 6 * matmul_params(cfg) + 6 * 2 * 32 * 4 * 16


def test_peak_flops_table():
    dev = lambda kind: SimpleNamespace(device_kind=kind)  # noqa: E731
    assert peak_flops(dev("NVIDIA H100 80GB HBM3"), "bfloat16") == 989e12
    assert peak_flops(dev("NVIDIA H100 PCIe"), "bfloat16") == 756e12
    assert peak_flops(dev("NVIDIA H100 80GB HBM3"), "float32") == 494.5e12
    assert peak_flops(dev("TPU v5 lite"), "bfloat16") == 197e12
    assert peak_flops(dev("TPU v5"), "bfloat16") == 459e12
    assert peak_flops(dev("TPU v6 lite"), "bfloat16") == 918e12
    assert peak_flops(dev("cpu"), "float32") is None


def test_metrics_jsonl_has_the_stable_keys(tiny, tmp_path):
    train(tiny(f"run.output_dir={tmp_path}", "logging.tensorboard=true", "train.steps=4", "logging.every_steps=2"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert {"step", "loss", "grad_norm", "lr", "tokens_per_sec", "mfu"} <= set(row)
        assert row["tokens_per_sec"] > 0 and row["mfu"] is None  # CPU: no peak, TFLOP/s instead
        assert row["tflops_per_sec_per_device"] > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(tmp_path / "config.yml").run.output_dir == str(tmp_path)
