"""Pipeline parallelism: the layer stack split into stages over the `stage` axis.

An SPMD pipeline in the style of GPipe, written as one program for every device:
the stacked layer parameters (L, ...) are viewed as (R, S, L/(R*S), ...) and the
stage dimension is sharded over `mesh.stage`. The batch is cut into M
microbatches. At each tick every stage runs its layers on the microbatch it
holds (`jax.vmap` over the stage dimension, partitioned by `spmd_axis_name` so
that each device computes only its own stage), then the activations move one
stage on (`jnp.roll` over the sharded dimension: a collective permute).

    tick:      0    1    2    3    4          S=3 stages, M=3 microbatches
    stage 0:  m0   m1   m2    .    .          (. is the bubble: a stage
    stage 1:   .   m0   m1   m2    .           computing nothing useful)
    stage 2:   .    .   m0   m1   m2

A step takes M*R + S - 1 ticks of L/(R*S) layers each, against M*L/S for a
perfect pipeline: the bubble is (S-1)/(M*R+S-1) of the time. More microbatches
shrink it; so does a circular pipeline (R > 1 repeats): stage s holds R chunks of
layers spread through the stack, a microbatch goes round the ring R times, and
the stages wait for S-1 short ticks instead of S-1 long ones. Circular needs
M >= S: a microbatch comes back to stage 0 only after the others went in.

Layer l of the model is the l-th applied, as without a pipeline, so the losses are
the single-device losses. With R > 1 the layers a stage holds are not contiguous
in the stack: each step regathers them (an all-to-all of the layer parameters
over the stage axis, and its transpose for the gradients).

Embedding and final norm run outside the pipeline, on every stage; the head's
vocabulary is split over the stage axis (the activation rules map `vocab` to
tensor and stage), so it costs each stage 1/S of its work.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from maxllm.mesh import active_rules

STAGE_AXIS = "stage"


class Schedule(NamedTuple):
    microbatches: int | None  # None: as many as stages
    repeats: int  # 1: a plain pipeline; > 1: circular


_SCHEDULE: contextvars.ContextVar[Schedule] = contextvars.ContextVar("maxllm_pipeline", default=Schedule(None, 1))


@contextlib.contextmanager
def schedule(microbatches: int | None, repeats: int) -> Iterator[None]:
    """Within this context, a pipelined forward uses this schedule."""
    token = _SCHEDULE.set(Schedule(microbatches, repeats))
    try:
        yield
    finally:
        _SCHEDULE.reset(token)


def num_stages() -> int:
    """The size of the stage axis of the enclosing mesh (1 outside one)."""
    active = active_rules()
    return 1 if active is None else active[1].shape[STAGE_AXIS]


def check(num_layers: int, batch: int, stages: int, microbatches: int | None, repeats: int) -> str | None:
    """What is wrong with this pipeline, or None."""
    m = microbatches or stages
    if num_layers % (stages * repeats):
        return (f"model.num_layers={num_layers} does not split into mesh.stage={stages} x "
                f"train.pipeline_repeats={repeats} equal chunks")
    if batch % m:
        return f"{batch} rows per step do not split into train.microbatches={m}"
    if repeats > 1 and m < stages:
        return (f"a circular pipeline (train.pipeline_repeats={repeats}) needs train.microbatches >= "
                f"mesh.stage ({m} < {stages}): a microbatch comes back to stage 0 only after the others went in")
    return None


def pipeline(
    run_stage: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array],
    stacked: Any,
    x_BTD: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array,
) -> jax.Array:
    """Applies the L stacked layers to x as a pipeline over the stage axis.

    `run_stage(layers, x, positions, segment_ids)` applies a chunk of the stack
    (every leaf of `layers` has the chunk's layers first) to one microbatch."""
    S = num_stages()
    M, R = _SCHEDULE.get()
    M = M or S
    L = jax.tree.leaves(stacked)[0].shape[0]
    B = x_BTD.shape[0]
    problem = check(L, B, S, M, R)
    if problem:
        raise ValueError(problem)
    _, mesh = active_rules()

    # Microbatch m takes rows m, m+M, ...: every device keeps its share of each.
    def split(a):
        return a.reshape(B // M, M, *a.shape[1:]).swapaxes(0, 1)

    x_MbTD, pos_MbT, seg_MbT = split(x_BTD), split(positions_BT), split(segment_ids_BT)

    def by_stage(a, dim):  # pins dimension `dim` to the stage axis, the others as XLA likes
        spec = [PartitionSpec.UNCONSTRAINED] * a.ndim
        spec[dim] = STAGE_AXIS
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, PartitionSpec(*spec)))

    # (L, ...) -> (S, R, L/(R*S), ...): stage s, repeat r holds layers r*L/R + s*L/(R*S) + j.
    layers_SR = jax.tree.map(
        lambda p: by_stage(p.reshape(R, S, L // (R * S), *p.shape[1:]).swapaxes(0, 1), 0), stacked)
    stage_S = jnp.arange(S)
    run_all = jax.vmap(run_stage, spmd_axis_name=STAGE_AXIS)

    def tick(carry, t):
        state_SbTD, done_MbTD = carry
        # Stage 0 takes the next microbatch: a new one, or one back for another round.
        state_SbTD = state_SbTD.at[0].set(done_MbTD[t % M])
        m_S = (t - stage_S) % M  # the microbatch at each stage (garbage in the bubble)
        if R == 1:
            chunk = jax.tree.map(lambda p: p[:, 0], layers_SR)
        else:  # each stage's chunk for the round its microbatch is in
            r_S = jnp.clip((t - stage_S) // M, 0, R - 1)
            chunk = jax.tree.map(lambda p: jax.vmap(lambda p_s, r: p_s[r])(p, r_S), layers_SR)
        out_SbTD = by_stage(run_all(chunk, state_SbTD, pos_MbT[m_S], seg_MbT[m_S]), 0)
        # The last stage's microbatch is done with this round: back to the buffer.
        slot = (t - (S - 1)) % M
        finished = jnp.where(t >= S - 1, out_SbTD[S - 1], done_MbTD[slot])
        done_MbTD = done_MbTD.at[slot].set(finished)
        return (by_stage(jnp.roll(out_SbTD, 1, axis=0), 0), done_MbTD), None

    state = by_stage(jnp.zeros((S, *x_MbTD.shape[1:]), x_MbTD.dtype), 0)
    (_, done_MbTD), _ = jax.lax.scan(tick, (state, x_MbTD), jnp.arange(M * R + S - 1))
    return done_MbTD.swapaxes(0, 1).reshape(x_BTD.shape)
