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

Beside the compiled figures it prints an analytic estimate (`estimate`), worked
out from the config and the mesh alone, term by term, so a surprise in the
compiled peak shows which term it is in. Per device (B rows, T tokens, V vocab
entries and D model width after the activation rules split them; L layers):

    held through the step   train state: params + 2 AdamW moments, float32,
                            sharded by the params rules; the batch; the
                            gradients, float32, sharded like the params
    + the largest phase:
      LM head backward      saved activations (remat full: L x B x T x D);
                            the head weight gathered (D x V); the logits and
                            their gradient (B x T x V float32 each); the head's
                            gradient before its reduce-scatter (D x V float32)
      one layer's backward  saved activations; one layer's weights gathered and
                            their gradient before the reduce-scatter; attention
                            probabilities and their gradient (xla attention); the
                            MLP's gate and up activations and their gradients
      optimizer update      a second copy of the gradients (divided by the
                            token count, the input of clipping and AdamW)

Gathered weights and saved activations are in the compute dtype, except on the
CPU, whose XLA backend runs bfloat16 matmuls in float32: there it gathers the
weights and reads the saved activations back in float32.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, NamedTuple

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from maxllm.config import Config
from maxllm.mesh import (
    axis_size,
    format_rules,
    logical_to_spec,
    make_mesh,
    mesh_shape,
)
from maxllm.metrics import flops_per_token, param_count

GB = 1e9


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
    estimate: Estimate | None  # the analytic estimate; None where the config is not modelled

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
        if self.estimate is None:
            lines.append(f"  no analytic estimate: {not_modelled(cfg)}")
        else:
            lines += self.estimate.report(self.peak_bytes)
        if self.capacity_bytes:
            verdict = "fits" if self.peak_bytes <= self.capacity_bytes else "does NOT fit"
            lines.append(f"  {verdict}: the device has {self.capacity_bytes / gb:.2f} GB")
        return "\n".join(lines)


def plan(cfg: Config, devices: list[jax.Device] | None = None) -> Plan:
    """Compiles `cfg`'s train step on `devices` (default: all) without running it."""
    from maxllm import train as train_lib

    mesh = make_mesh(cfg.mesh, devices)
    platform = mesh.devices.flat[0].platform
    analytic = None if not_modelled(cfg) else estimate(cfg, mesh, platform)
    B, T = cfg.train.global_batch_size, cfg.data.seq_len
    sharding = train_lib.input_layout(cfg, mesh)
    start = time.perf_counter()
    with train_lib.step_context(cfg, mesh):
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
        estimate=analytic,
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


# ---------------------------------------------------------------------------------
# The analytic estimate


@dataclasses.dataclass
class Term:
    name: str
    bytes: int
    note: str = ""


@dataclasses.dataclass
class Estimate:
    """Memory per device of one step, modelled from the config and the mesh (no
    compilation): what is held through the step, plus the largest phase."""

    held: list[Term]  # the train state, the batch, the gradients
    phases: dict[str, list[Term]]  # what each phase adds on top

    @property
    def largest(self) -> str:
        return max(self.phases, key=lambda name: sum(t.bytes for t in self.phases[name]))

    @property
    def peak_bytes(self) -> int:
        return sum(t.bytes for t in self.held) + sum(t.bytes for t in self.phases[self.largest])

    def report(self, compiled_peak: int | None = None) -> list[str]:
        """The terms as lines; with `compiled_peak`, the ratio to it."""
        row = lambda t, indent: f"{indent}{t.name:<{30 - len(indent)}}{t.bytes / GB:8.2f} GB  {t.note}".rstrip()
        lines = ["  analytic estimate per device (from the config and mesh, no compile):"]
        lines += [row(t, "    ") for t in self.held]
        big = self.largest
        lines.append(f"    + {big} (the largest phase):")
        lines += [row(t, "      ") for t in self.phases[big]]
        others = ", ".join(f"{name} {sum(t.bytes for t in terms) / GB:.2f} GB"
                           for name, terms in self.phases.items() if name != big)
        lines.append(f"      (other phases: {others})")
        ratio = f"  = {self.peak_bytes / compiled_peak:.2f} x the compiled peak" if compiled_peak else ""
        lines.append(f"    {'peak':<26}{self.peak_bytes / GB:8.2f} GB{ratio}")
        return lines


def not_modelled(cfg: Config) -> str | None:
    """Why `estimate` has no model of `cfg`'s step, or None when it has one."""
    if cfg.model.family != "llama":
        return f"model.family={cfg.model.family} (the estimate models the dense llama family)"
    if cfg.model.remat != "full":
        return f"model.remat={cfg.model.remat} (the estimate models remat full)"
    if cfg.mesh.sequence != 1:
        return "mesh.sequence != 1 (the estimate does not model context parallelism yet)"
    if cfg.mesh.stage != 1:
        return "mesh.stage != 1 (the estimate does not model the pipeline's microbatch buffers yet)"
    if cfg.train.objective == "dpo":
        return "train.objective=dpo (the estimate models one forward per row)"
    if cfg.train.grad_accum_steps != 1:
        return "train.grad_accum_steps > 1 (the estimate models one batch per step)"
    return None


def estimate(cfg: Config, mesh: Mesh | AbstractMesh, platform: str) -> Estimate:
    """Memory per device of `cfg`'s train step on `mesh` (`abstract_mesh` will do:
    no devices needed) for `platform` ("cpu", "gpu", "tpu"); the terms are in the
    module docstring."""
    if reason := not_modelled(cfg):
        raise ValueError(f"no analytic estimate for {reason}")
    z = _local_sizes(cfg, mesh, platform)
    L, B, T, S, rows, dt = cfg.model.num_layers, z.B, z.T, z.S, f"{z.B} x {z.T}", z.dtype
    saved = Term("saved activations", L * B * T * z.D * dt.itemsize,
                 f"remat full: each layer's input, {L} x {rows} x {z.D} {dt}")
    gradients = Term("gradients", 4 * z.shard, "float32, sharded like the params")
    flash = cfg.model.attention != "xla"
    return Estimate(
        held=[
            Term("train state", 3 * 4 * z.shard, "params + 2 AdamW moments, float32, sharded by the rules"),
            Term("batch", 5 * B * T * 4, f"inputs, targets, positions, segment ids, loss mask: {rows}"),
            gradients,
        ],
        phases={
            "LM head backward": [
                saved,
                Term("head weight, gathered", z.head * dt.itemsize, f"{z.head // z.V} x {z.V} {dt}"),
                Term("logits", B * T * z.V * 4, f"{rows} x {z.V} float32"),
                Term("logits gradient", B * T * z.V * 4, f"{rows} x {z.V} float32"),
                Term("head gradient, whole", z.head * 4, "float32, before its reduce-scatter"),
            ],
            "one layer's backward": [
                saved,
                Term("layer weights, gathered", z.layer * dt.itemsize, f"{z.layer / 1e6:.0f}M {dt}"),
                Term("layer gradient, whole", z.layer * 4, "float32, before its reduce-scatter"),
                Term("attention probabilities", 0 if flash else 2 * B * z.N * T * S * 4,
                     "none kept (flash)" if flash else f"and their gradient: 2 x {B} x {z.N} x {T} x {S} float32"),
                Term("MLP activations", 4 * B * T * z.F * dt.itemsize,
                     f"gate, up and their gradients: 4 x {rows} x {z.F} {dt}"),
            ],
            "optimizer update": [dataclasses.replace(gradients, name="gradients / token count", note="a second copy")],
        },
    )


def abstract_mesh(cfg: Config, num_devices: int) -> AbstractMesh:
    """`cfg`'s mesh over `num_devices` devices that need not exist, for `estimate`."""
    sizes = mesh_shape(cfg.mesh, num_devices)
    return AbstractMesh(tuple(sizes.values()), tuple(sizes))


class _Local(NamedTuple):
    """Sizes on one device: rows B, tokens T, keys S, widths D, N (heads), F, V;
    elements of the parameter shards, one layer's gathered weights, the gathered
    head; the dtype matmuls gather and read in."""

    B: int
    T: int
    S: int
    D: int
    N: int
    F: int
    V: int
    shard: int
    layer: int
    head: int
    dtype: Any


def _local_sizes(cfg: Config, mesh: Mesh | AbstractMesh, platform: str) -> _Local:
    m, prules, arules = cfg.model, cfg.mesh.rules.params, cfg.mesh.rules.activations
    split = lambda name: axis_size(name, arules, mesh)
    params = _abstract_params(cfg)
    head_path = ("embed", "table") if m.tie_embeddings else ("lm_head",)
    return _Local(
        B=cfg.train.global_batch_size // split("batch"),
        T=cfg.data.seq_len // split("length"),
        S=cfg.data.seq_len,  # each query sees all keys of its row
        D=m.d_model // split("embed"),
        N=m.num_heads // split("heads"),
        F=m.mlp_dim // split("mlp"),
        V=m.vocab_size // split("vocab"),
        shard=sum(_elements(shape, axes, prules, mesh) for _, shape, axes in params),
        layer=sum(_elements(shape[1:], axes[1:], arules, mesh) for _, shape, axes in params if axes[:1] == ("layers",)),
        head=next(_elements(shape, axes, arules, mesh) for path, shape, axes in params if path == head_path),
        dtype=_matmul_dtype(m.dtype, platform),
    )


def _matmul_dtype(name: str, platform: str) -> Any:
    """The compute dtype on `platform`, except that XLA:CPU runs bfloat16 matmuls in
    float32: it gathers the weights and reads the saved activations back in float32."""
    if platform == "cpu":
        return jax.numpy.dtype("float32")
    return jax.numpy.dtype("bfloat16" if name == "auto" else name)  # auto: bfloat16 on GPU and TPU


def _abstract_params(cfg: Config) -> list[tuple[tuple[str, ...], tuple[int, ...], tuple[str | None, ...]]]:
    """(path, shape, logical axes) of every parameter, from shapes only."""
    from flax import nnx

    from maxllm.models import build_model

    _, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model, cfg.train.seed)))
    out = []
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("axes") or (None,) * len(var.shape)
        out.append((tuple(str(k) for k in path), tuple(var.shape), tuple(axes)))
    return out


def _elements(shape: tuple[int, ...], names: tuple[str | None, ...], rules: dict[str, Any],
              mesh: Mesh | AbstractMesh) -> int:
    """Elements of one device's shard of an array laid out by `rules`."""
    spec = logical_to_spec(names, rules, mesh, shape)
    return math.prod(
        size // math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry or ()))
        for size, entry in zip(shape, spec)
    )


def main(cfg: Config) -> None:
    print(plan(cfg).report(cfg))
