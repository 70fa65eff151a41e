"""Sharded training equals single-device training, step by step."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from maxllm.config import MESH_AXES
from maxllm.mesh import ShardingError, logical_to_spec, make_mesh, mesh_shape
from maxllm.train import train

MESHES = {
    "data=8": dict(data=8),
    "fsdp=8": dict(fsdp=8),
    "fsdp=4,tensor=2": dict(fsdp=4, tensor=2),
    "data=2,sequence=2,tensor=2": dict(data=2, sequence=2, tensor=2),
}


def _mesh_overrides(sizes):
    return [f"mesh.{a}={sizes.get(a, 1)}" for a in MESH_AXES]


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    from maxllm.config import load_config

    from conftest import TINY

    cfg = load_config(TINY, [f"run.output_dir={tmp_path_factory.mktemp('single')}"])
    result = train(cfg, devices=jax.devices()[:1])
    assert len(result.history) == 5
    return result.history


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_losses_equal_single_device(name, tiny, tmp_path, single_device_losses):
    cfg = tiny(*_mesh_overrides(MESHES[name]), f"run.output_dir={tmp_path}")
    result = train(cfg)
    for step, expected in single_device_losses.items():
        got = result.history[step]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), f"step {step} on {name}"
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5), f"step {step} on {name}"
    # The mesh was really used: parameters are split the way the rules say.
    wq = result.state["params"]["layers"]["attn"]["wq"]
    expected_spec = {
        "data=8": P(None, None, None, None),
        "fsdp=8": P(None, "fsdp", None, None),
        "fsdp=4,tensor=2": P(None, "fsdp", "tensor", None),
        "data=2,sequence=2,tensor=2": P(None, None, "tensor", None),
    }[name]
    assert wq.sharding.spec == expected_spec
    assert len(wq.sharding.device_set) == 8


def test_grad_accumulation_equals_one_big_batch(tiny, tmp_path):
    common = ["mesh.fsdp=8", "train.global_batch_size=16", "train.steps=3", "train.warmup_steps=0"]
    whole = train(tiny(*common, f"run.output_dir={tmp_path / 'a'}"))
    accum = train(tiny(*common, "train.grad_accum_steps=2", f"run.output_dir={tmp_path / 'b'}"))
    for step, metrics in whole.history.items():
        # grad_norm is taken before clipping: a mis-scaled gradient would show here.
        assert accum.history[step]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-5)
        assert accum.history[step]["loss"] == pytest.approx(metrics["loss"], rel=1e-5)


def test_mesh_fill_and_mismatch(tiny):
    cfg = tiny("mesh.fsdp=-1", "mesh.tensor=2").mesh
    assert mesh_shape(cfg, 8) == dict(data=1, fsdp=4, tensor=2, sequence=1, expert=1, stage=1)
    with pytest.raises(ShardingError, match="mesh fsdp=2 x tensor=2 has 4 devices but 8 are available"):
        mesh_shape(tiny("mesh.fsdp=2", "mesh.tensor=2").mesh, 8)


def test_rules_skip_reused_and_unit_axes(tiny):
    mesh = make_mesh(tiny("mesh.fsdp=4", "mesh.tensor=2").mesh)
    rules = {"batch": ["data", "fsdp"], "embed": "fsdp", "heads": "tensor"}
    # data has size 1 (dropped); fsdp is taken by batch, so embed stays replicated.
    assert logical_to_spec(("batch", "embed", "heads"), rules, mesh) == P("fsdp", None, "tensor")
    with pytest.raises(ShardingError, match=r"wq: dimension 1 \(heads=3\) does not divide mesh axis tensor=2"):
        logical_to_spec(("embed", "heads"), rules, mesh, (8, 3), "wq")


def test_batch_that_does_not_divide_is_an_error(tiny, tmp_path):
    with pytest.raises(ShardingError, match=r"input batch: dimension 0 \(batch=6\) does not divide mesh axis fsdp=8"):
        train(tiny("mesh.fsdp=8", "train.global_batch_size=6", f"run.output_dir={tmp_path}"))
