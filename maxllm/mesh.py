"""The device mesh and the one table that maps logical axis names to mesh axes.

Model code names the dimensions of its parameters and activations with logical
names (`embed`, `heads`, `batch`, ...). `config.mesh.rules` maps each name to mesh
axes, separately for parameters and activations. Everything sharding-related is
derived here from that table; the model never names a mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxllm.config import MESH_AXES, ConfigError, MeshConfig

log = logging.getLogger(__name__)

Rules = dict[str, Any]


class ShardingError(ConfigError):
    """A dimension that does not divide its mesh axes, or a mesh that does not fit."""


# ---------------------------------------------------------------------------------
# Multi-host


_MULTIPROCESS_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # explicit: with JAX_NUM_PROCESSES / JAX_PROCESS_ID
    "COORDINATOR_ADDRESS",
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
)


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when the environment describes a
    multi-process job (TPU pod, SLURM, Open MPI, or explicit JAX_* variables)."""
    if jax.distributed.is_initialized():
        return
    env = os.environ
    several = (
        any(env.get(k) for k in _MULTIPROCESS_ENV)
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
    if not several:
        return
    kwargs: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = dict(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


# ---------------------------------------------------------------------------------
# Mesh


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 axis filled; errors when they do not match the devices."""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    for axis, size in sizes.items():
        if size == -1:
            if num_devices % known:
                raise ShardingError(
                    f"mesh.{axis}=-1 cannot fill {num_devices} devices: the other axes "
                    f"multiply to {known}"
                )
            sizes[axis] = num_devices // known
    total = int(np.prod(list(sizes.values())))
    if total != num_devices:
        shown = " x ".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "1"
        raise ShardingError(
            f"mesh {shown} has {total} devices but {num_devices} are available; "
            "set one axis to -1 to fill"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices == list(jax.devices()) and jax.default_backend() == "tpu":
        # Topology-aware order on TPU: neighbouring mesh positions share ICI links.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    else:
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


# ---------------------------------------------------------------------------------
# Logical names -> PartitionSpec


def logical_to_spec(
    names: Sequence[str | None],
    rules: Rules,
    mesh: Mesh,
    shape: Sequence[int] | None = None,
    what: str = "array",
) -> PartitionSpec:
    """Maps one logical name per dimension to mesh axes.

    Mesh axes of size 1 are dropped (they cost nothing). A mesh axis already used by
    an earlier dimension is skipped. With `shape`, a dimension that does not divide
    the product of its mesh axes is a `ShardingError` naming `what` and the axis.
    """
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(names):
        target = rules.get(name) if name is not None else None
        axes = [target] if isinstance(target, str) else list(target or [])
        axes = [a for a in axes if a not in used and mesh.shape[a] > 1]
        used.update(axes)
        if shape is not None and axes:
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if shape[dim] % size:
                joined = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
                raise ShardingError(
                    f"{what}: dimension {dim} ({name}={shape[dim]}) does not divide "
                    f"mesh axis {joined}"
                )
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def param_shardings(abstract_state: Any, rules: Rules, mesh: Mesh) -> dict[str, Any]:
    """NamedShardings, as a pure nested dict, for an `nnx.State` whose Variables
    carry `axes` metadata (see `maxllm.models.layers.param`)."""
    from flax import nnx

    out: dict[str, Any] = {}
    for path, var in nnx.to_flat_state(abstract_state):
        where = "parameter " + "/".join(str(p) for p in path)
        names = var.get_metadata().get("axes") or (None,) * var.ndim
        if len(names) != var.ndim:
            raise ShardingError(f"{where}: {len(names)} axis names for {var.ndim} dims")
        spec = logical_to_spec(names, rules, mesh, var.shape, where)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = NamedSharding(mesh, spec)
    return out


def format_rules(rules_cfg: Any, mesh: Mesh) -> str:
    sizes = " ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
    lines = [f"mesh: {sizes}"]
    for table in ("params", "activations"):
        rules = getattr(rules_cfg, table)
        cells = ", ".join(f"{k}->{_fmt_axes(v)}" for k, v in rules.items())
        lines.append(f"rules.{table}: {cells}")
    return "\n".join(lines)


def _fmt_axes(v: Any) -> str:
    if v is None:
        return "-"
    return v if isinstance(v, str) else "(" + ",".join(v) + ")"


# ---------------------------------------------------------------------------------
# Activation constraints


_ACTIVE: contextvars.ContextVar[tuple[Rules, Mesh] | None] = contextvars.ContextVar(
    "maxllm_activation_rules", default=None
)


@contextlib.contextmanager
def activation_rules(rules: Rules, mesh: Mesh) -> Iterator[None]:
    """Within this context, `constrain` pins activations to the mesh."""
    token = _ACTIVE.set((rules, mesh))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `activation_rules`,
    so model code stays single-device code."""
    active = _ACTIVE.get()
    if active is None:
        return x
    rules, mesh = active
    spec = logical_to_spec(names, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def active_rules() -> tuple[Rules, Mesh] | None:
    """The activation rules and mesh of the enclosing `activation_rules`, if any."""
    return _ACTIVE.get()


def is_sharded(name: str) -> bool:
    """Whether activations' logical dimension `name` is split over devices now."""
    active = _ACTIVE.get()
    if active is None:
        return False
    rules, mesh = active
    return logical_to_spec((name,), rules, mesh)[0] is not None


def axis_size(name: str, rules: Rules, mesh: Mesh) -> int:
    """How many ways the logical dimension `name` is split over `mesh`."""
    size = 1
    for entry in logical_to_spec((name,), rules, mesh):
        for axis in (entry,) if isinstance(entry, str) else entry or ():
            size *= mesh.shape[axis]
    return size


def batch_sharding(rules: Rules, mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a (batch, length) input array; errors when the batch does not divide."""
    spec = logical_to_spec(("batch", "length"), rules, mesh, shape, "input batch")
    return NamedSharding(mesh, spec)
