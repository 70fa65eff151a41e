"""Dry run: compile a config's train step without running it, and say what one
step costs and whether it fits.

    python -m maxllm.train --config CONFIG.yml --dry-run [section.key=value ...]

Builds the mesh on the devices this process sees, the train state as abstract
shapes with their shardings, and the step; lowers and compiles it (nothing is
allocated, no data read, nothing written) and prints the parameters, the model
FLOPs of a step, and the memory per device from XLA's analysis of the compiled
executable. To plan for a pod from a laptop, give the CPU as many devices as the
pod has: `XLA_FLAGS=--xla_force_host_platform_device_count=256 JAX_PLATFORMS=cpu`
(compiled for CPU, so kernels and fusion differ a little from the accelerator's).
"""

from __future__ import annotations

import dataclasses
import time

import jax
from jax.sharding import NamedSharding

from maxllm.config import Config
from maxllm.mesh import activation_rules, batch_sharding, format_rules, make_mesh
from maxllm.metrics import flops_per_token, param_count


@dataclasses.dataclass
class Plan:
    """One step of a config on a mesh, per device where it says so."""

    devices: int
    mesh: str  # the axis sizes
    params: int
    tokens_per_step: int
    flops_per_step: float  # model FLOPs (6N + attention per token), all devices
    state_bytes: int  # train state per device: parameters, optimizer moments (and DPO's frozen reference)
    argument_bytes: int  # what the step takes per device: the state and the batch
    temp_bytes: int  # XLA temporaries: activations, gradients, gathered weights
    output_bytes: int  # outputs not written in place of a donated argument
    compile_seconds: float
    capacity_bytes: int | None  # the device's memory, where the runtime says

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes

    def report(self, cfg: Config) -> str:
        gb = 1e9
        dpo = " (pairs)" if cfg.train.objective == "dpo" else ""
        lines = [
            self.mesh,
            f"dry run: {cfg.model.family}, {self.params / 1e9:.3g}B parameters, {self.devices} devices "
            f"({jax.devices()[0].platform}), compiled in {self.compile_seconds:.1f}s",
            f"  step: {cfg.train.global_batch_size}{dpo} x {cfg.data.seq_len} tokens, "
            f"{self.flops_per_step:.3g} model FLOPs ({self.flops_per_step / self.devices:.3g} per device)",
            "  memory per device (XLA's analysis of the compiled step):",
            f"    train state   {self.state_bytes / gb:8.2f} GB",
            f"    arguments     {self.argument_bytes / gb:8.2f} GB  (the state and the batch)",
            f"    temporaries   {self.temp_bytes / gb:8.2f} GB  (activations, gradients, gathered weights)",
            f"    outputs       {self.output_bytes / gb:8.2f} GB  (not written over a donated argument)",
            f"    peak          {self.peak_bytes / gb:8.2f} GB",
        ]
        if self.capacity_bytes:
            verdict = "fits" if self.peak_bytes <= self.capacity_bytes else "does NOT fit"
            lines.append(f"  {verdict}: the device has {self.capacity_bytes / gb:.2f} GB")
        return "\n".join(lines)


def plan(cfg: Config, devices: list[jax.Device] | None = None) -> Plan:
    """Compiles `cfg`'s train step on `devices` (default: all) without running it."""
    from maxllm import train as train_lib

    mesh = make_mesh(cfg.mesh, devices)
    B, T = cfg.train.global_batch_size, cfg.data.seq_len
    batch_sharding(cfg.mesh.rules.activations, mesh, (B // cfg.train.grad_accum_steps, T))
    sharding = batch_sharding(cfg.mesh.rules.activations, mesh, (B, T))
    start = time.perf_counter()
    with jax.set_mesh(mesh), activation_rules(cfg.mesh.rules.activations, mesh):
        spec = train_lib.train_state_spec(cfg, mesh)
        shardings, batch = abstract_batch(cfg, sharding)
        step = train_lib.make_train_step(cfg, spec.graphdef, spec.tx, spec.shardings, shardings)
        compiled = step.lower(spec.abstract, batch).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    n = mesh.devices.size
    rows = B * (2 if cfg.train.objective == "dpo" else 1)
    capacity = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    return Plan(
        devices=n,
        mesh=format_rules(cfg.mesh.rules, mesh).splitlines()[0],
        params=param_count(cfg.model),
        tokens_per_step=rows * T,
        flops_per_step=flops_per_token(cfg.model, T) * rows * T,
        state_bytes=sum(_shard_bytes(x) for x in jax.tree.leaves(spec.abstract)),
        argument_bytes=stats.argument_size_in_bytes,
        temp_bytes=stats.temp_size_in_bytes,
        output_bytes=stats.output_size_in_bytes - stats.alias_size_in_bytes,
        compile_seconds=seconds,
        capacity_bytes=capacity,
    )


def abstract_batch(cfg: Config, sharding: NamedSharding) -> tuple[dict, dict]:
    """The step's batch shardings and abstract arrays, without reading any data."""
    from maxllm.data import BATCH_KEYS

    B, T = cfg.train.global_batch_size, cfg.data.seq_len
    if cfg.train.objective == "dpo":
        from maxllm.posttrain.input import batch_shardings

        shardings = batch_shardings(cfg, sharding)
        shapes = {k: (B, 2, T) for k in BATCH_KEYS} | {"ref_logps": (B, 2)}
    else:
        shardings = dict.fromkeys(BATCH_KEYS, sharding)
        shapes = dict.fromkeys(BATCH_KEYS, (B, T))
    batch = {k: jax.ShapeDtypeStruct(shapes[k], "float32" if k in ("loss_mask", "ref_logps") else "int32", sharding=s)
             for k, s in shardings.items()}
    return shardings, batch


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    size = 1
    for d in shape:
        size *= d
    return size * x.dtype.itemsize


def main(cfg: Config) -> None:
    print(plan(cfg).report(cfg))
