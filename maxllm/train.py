"""Pre-training entry point.

    python -m maxllm.train --config configs/quickstart.yml [section.key=value ...]

Builds the mesh, the model and optimizer state (sharded by the rules table), the
data source and the checkpointer; resumes from the newest complete checkpoint in
the run directory; runs one jitted step per batch with the state donated; logs,
checkpoints on a cadence, saves on SIGTERM and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxllm import data as data_lib
from maxllm import storage
from maxllm.checkpoint import Checkpointer, checkpoint_dir
from maxllm.cli import log_to_stderr
from maxllm.config import Config, ConfigError, load_config
from maxllm.hf.adapters import HFError
from maxllm.mesh import (
    ShardingError,
    activation_rules,
    active_rules,
    axis_size,
    batch_sharding,
    format_rules,
    make_mesh,
    maybe_initialize_distributed,
    param_shardings,
)
from maxllm.metrics import MetricsWriter, flops_per_token, param_count, peak_flops
from maxllm.models import build_model, pipeline
from maxllm.models.context import load_balanced_order
from maxllm.models.layers import compute_dtype
from maxllm.optim import build_optimizer, learning_rate_schedule
from maxllm.sample import greedy_generate

log = logging.getLogger("maxllm.train")

State = dict[str, Any]
BATCH_KEYS = data_lib.BATCH_KEYS  # each (B, T); DPO's are (B, 2, T)


@dataclasses.dataclass
class RunResult:
    """What a run leaves in memory: the step metrics this process computed (from the
    step it started at), and the final state."""

    history: dict[int, dict[str, float]]
    state: State
    graphdef: nnx.GraphDef
    start_step: int
    samples: list[str]

    @property
    def losses(self) -> dict[int, float]:
        return {step: m["loss"] for step, m in self.history.items()}


# ---------------------------------------------------------------------------------
# State


class TrainStateSpec(NamedTuple):
    """How to build the train state: abstract shapes with shardings, and `init`, a
    jitted function that materializes a fresh state directly on the devices."""

    graphdef: nnx.GraphDef
    abstract: State
    shardings: State
    init: Callable[[], State]
    tx: optax.GradientTransformation


def train_state_spec(cfg: Config, mesh: Mesh) -> TrainStateSpec:
    """The state is {step, params, opt_state, rng}: rng is the run's base PRNG key,
    saved so that families and objectives that draw randomness resume exactly."""
    tx = build_optimizer(cfg.train)
    abstract_model = nnx.eval_shape(lambda: build_model(cfg.model, cfg.train.seed))
    graphdef, abstract_params = nnx.split(abstract_model)
    p_shardings = param_shardings(abstract_params, cfg.mesh.rules.params, mesh)

    def init() -> State:
        return fresh_state(cfg, tx, nnx.to_pure_dict(nnx.state(build_model(cfg.model, cfg.train.seed))))

    shapes = jax.eval_shape(init)
    shardings = _state_shardings(shapes, p_shardings, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return TrainStateSpec(graphdef, abstract, shardings, jax.jit(init, out_shardings=shardings), tx)


def fresh_state(cfg: Config, tx: optax.GradientTransformation, params: dict) -> State:
    """Step 0 from `params`. DPO with a frozen reference keeps a copy of the
    starting parameters as `ref_params` (checkpointed with the rest, so a resumed
    run scores pairs against the same reference)."""
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(cfg.train.seed)),
    }
    if uses_frozen_reference(cfg):
        state["ref_params"] = jax.tree.map(jnp.copy, params)
    return state


def uses_frozen_reference(cfg: Config) -> bool:
    return cfg.train.objective == "dpo" and not cfg.dpo.precompute_ref


def _state_shardings(abstract_state: State, p_shardings: dict, mesh: Mesh) -> State:
    """Parameters by the rules table; optimizer moments like the parameter they
    track (matched by the parameter's path at the end of theirs); everything else
    replicated."""
    by_path = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(p_shardings)[0]:
        by_path[tuple(k.key for k in path)] = sharding
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = []
        for entry in reversed(path):
            if not isinstance(entry, jax.tree_util.DictKey):
                break
            keys.insert(0, entry.key)
        for i in range(len(keys)):
            sharding = by_path.get(tuple(keys[i:]))
            if sharding is not None:
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


# ---------------------------------------------------------------------------------
# Step


def token_loss_sums(
    logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, z_loss: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(objective, cross-entropy, token count), summed over tokens where mask is 1.

    The objective adds `z_loss * logsumexp(logits)^2` per token (PaLM's z-loss).
    Sums, not means, so microbatches add up to exactly the full batch."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    nll = jnp.sum((lse_BT - target_BT) * mask_BT)
    total = nll + z_loss * jnp.sum(jnp.square(lse_BT) * mask_BT)
    return total, nll, jnp.sum(mask_BT)


def pretrain_objective(cfg: Config, graphdef: nnx.GraphDef) -> Callable:
    """Next-token cross-entropy over the tokens where loss_mask is 1 (plus z-loss
    and the model's aux losses): (params, batch, _) -> (summed objective,
    (token count, {"loss": summed cross-entropy}, aux metrics))."""
    z_coef = cfg.train.z_loss

    def objective(params, batch, _frozen):
        model = nnx.merge(graphdef, params)
        logits_BTV, _, aux = model(batch["inputs"], batch["positions"], batch["segment_ids"], train=True)
        total, nll, count = token_loss_sums(logits_BTV, batch["targets"], batch["loss_mask"], z_coef)
        total += sum(aux.get("loss", {}).values(), jnp.zeros(())) * count  # aux losses are per-token means
        return total, (count, {"loss": nll}, aux.get("metrics", {}))

    return objective


def training_objective(cfg: Config, graphdef: nnx.GraphDef) -> Callable:
    if cfg.train.objective == "dpo":
        from maxllm.posttrain.dpo import dpo_objective

        return dpo_objective(cfg.dpo, graphdef)
    return pretrain_objective(cfg, graphdef)  # sft: the same loss, masked to the learned tokens


def make_train_step(
    cfg: Config,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    state_shardings: State,
    batch_shardings: dict[str, NamedSharding],
) -> Callable[[State, dict], tuple[State, dict]]:
    """The jitted step. The objective returns sums over its units (tokens, or
    DPO's pairs) and their count, so microbatches add up to exactly the full
    batch; gradients and summed metrics are divided by the count at the end."""
    schedule = learning_rate_schedule(cfg.train)
    accum = cfg.train.grad_accum_steps
    grad_fn = jax.value_and_grad(training_objective(cfg, graphdef), has_aux=True)

    def grads_and_sums(params, batch, frozen):
        """Gradients and metrics summed over the batch, the count they are sums
        over, and the model's aux metrics (averaged over microbatches)."""
        if accum == 1:
            (_, (count, sums, aux)), grads = grad_fn(params, batch, frozen)
            return grads, count, sums, aux

        def split(x, sharding):
            # Microbatch a takes rows a, a+accum, ...: each device keeps an equal share.
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec)))

        def body(carry, micro):
            grads, count, sums = carry
            (_, (c, s, aux)), g = grad_fn(params, micro, frozen)
            return (jax.tree.map(jnp.add, grads, g), count + c, jax.tree.map(jnp.add, sums, s)), aux

        zeros = jax.tree.map(jnp.zeros_like, params)
        _, (_, sum_shapes, _) = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[: x.shape[0] // accum], batch), frozen)[0]
        init = (zeros, jnp.zeros(()), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sum_shapes))
        (grads, count, sums), aux = jax.lax.scan(body, init, jax.tree.map(split, batch, dict(batch_shardings)))
        return grads, count, sums, jax.tree.map(lambda x: jnp.mean(x, axis=0), aux)

    order = _context_order(cfg)

    def step(state: State, batch: dict) -> tuple[State, dict]:
        if order is not None:  # the loss sums over tokens: any order gives the same step
            batch = {k: x[..., order] if k in BATCH_KEYS else x for k, x in batch.items()}
        grads, count, sums, aux = grads_and_sums(state["params"], batch, state.get("ref_params"))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)
        # A NaN or Inf loss or gradient skips the update: parameters and moments stay
        # as they were, so no checkpoint ever holds poisoned values. The batch is
        # consumed and the optimizer's step counters go on, so the learning rate
        # follows the step number. A conditional, not a select: no second copy of
        # the state is ever live.
        finite = jnp.isfinite(grad_norm) & jnp.all(jnp.stack([jnp.isfinite(v) for v in sums.values()]))

        def update(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def skip(params, opt_state):
            return params, jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.integer) else x, opt_state)

        params, opt_state = jax.lax.cond(finite, update, skip, state["params"], state["opt_state"])
        metrics = {
            **{k: v / count for k, v in sums.items()},
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "skipped": 1.0 - finite.astype(jnp.float32),
            **aux,
        }
        new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )


def _context_order(cfg: Config) -> np.ndarray | None:
    """With rows split over the sequence axis, the load-balanced order of a row's
    tokens (maxllm.models.context); None when they are not reordered."""
    shards = _balanced_shards(cfg, *active_rules())
    return None if shards == 1 else load_balanced_order(cfg.data.seq_len, shards)


def _balanced_shards(cfg: Config, rules: Any, mesh: Mesh) -> int:
    """How many ways rows are split over the sequence axis and reordered for load
    balance; 1 when they are not (no split, or Mamba, whose scan reads tokens in order)."""
    return 1 if cfg.model.family == "mamba" else axis_size("length", rules, mesh)


def make_eval_step(graphdef: nnx.GraphDef, param_shardings: Any, input_sharding: NamedSharding):
    """(params, batch) -> (summed cross-entropy, token count) over the batch."""

    def step(params, batch):
        model = nnx.merge(graphdef, params)
        logits_BTV, _, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        _, nll, count = token_loss_sums(logits_BTV, batch["targets"], batch["loss_mask"], 0.0)
        return nll, count

    return jax.jit(step, in_shardings=(param_shardings, dict.fromkeys(BATCH_KEYS, input_sharding)))


def evaluate(eval_step, params, eval_input: data_lib.EvalInput) -> dict[str, float]:
    """Loss and perplexity over the whole held-out split (token-weighted)."""
    nll, count = 0.0, 0.0
    for batch in eval_input.batches():
        n, c = jax.device_get(eval_step(params, batch))
        nll, count = nll + float(n), count + float(c)
    loss = nll / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss)), "eval_tokens": count}


# ---------------------------------------------------------------------------------
# Loop


class _Preemption:
    """Decides when a preempted job stops. One process: a SIGTERM handler sets a
    flag. Several: JAX's preemption notifier (set up by jax.distributed) catches
    SIGTERM and every process stops at the same step, so their saves line up."""

    def __init__(self):
        self.multiprocess = jax.process_count() > 1
        self.received = False
        self._previous = None

    def __enter__(self) -> "_Preemption":
        # Signal handlers can only be set from the main thread (not, e.g., a notebook worker).
        if not self.multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM: saving a checkpoint after the current step, then exiting")
        self.received = True

    def stop_at(self, step: int) -> bool:
        if self.multiprocess and not self.received:
            from jax.experimental import multihost_utils

            self.received = multihost_utils.reached_preemption_sync_point(step)
        return self.received


class _Throughput:
    """Tokens/s and FLOP/s between logged steps, from host wall time."""

    def __init__(self, cfg: Config, tokens_per_step: int, num_devices: int):
        self.tokens_per_step = tokens_per_step
        self.num_devices = num_devices
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = peak_flops(jax.devices()[0], compute_dtype(cfg.model.dtype))
        self.mark: tuple[int, float] | None = None

    def start(self, step: int) -> None:
        self.mark = (step, time.perf_counter())

    def measure(self, step: int) -> dict[str, float | None]:
        """Rates since the last call; None on the first step after a (re)start."""
        now = time.perf_counter()
        keys = ("tokens_per_sec", "tokens_per_sec_per_device", "tflops_per_sec_per_device", "mfu")
        if self.mark is None or step <= self.mark[0]:
            return dict.fromkeys(keys)
        per_sec = (step - self.mark[0]) * self.tokens_per_step / (now - self.mark[1])
        self.mark = (step, now)
        per_device = per_sec / self.num_devices
        flops = per_device * self.flops_per_token
        return dict(zip(keys, (per_sec, per_device, flops / 1e12, flops / self.peak if self.peak else None)))


def train(cfg: Config, devices: list[jax.Device] | None = None) -> RunResult:
    """Runs (or resumes) the training described by `cfg`."""
    mesh = make_mesh(cfg.mesh, devices)
    if cfg.train.objective != "pretrain" and not cfg.data.tokenizer:
        from maxllm.posttrain.train import run_tokenizer

        # Recorded in the run's config.yml, for export, evaluation and serving.
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"tokenizer": str(Path(run_tokenizer(cfg).path).resolve())})})
    out_dir = cfg.run.output_dir
    if jax.process_index() == 0:
        storage.makedirs(out_dir)
        storage.write_text(storage.join(out_dir, "config.yml"), cfg.to_yaml())
    log.info("%s", format_rules(cfg.mesh.rules, mesh))
    input_sharding = input_layout(cfg, mesh)

    with step_context(cfg, mesh):
        spec = train_state_spec(cfg, mesh)
        data = _train_input(cfg, input_sharding)
        step_fn = make_train_step(cfg, spec.graphdef, spec.tx, spec.shardings, data.shardings)
        evaluator = _evaluator(cfg, spec, mesh, input_sharding, data)  # a bad task fails here
        checkpointer = None
        if cfg.checkpoint.enabled:
            checkpointer = Checkpointer(
                checkpoint_dir(out_dir, cfg.checkpoint), cfg.checkpoint, cfg.to_dict(), data.handlers()
            )
        try:
            start = checkpointer.latest_step() if checkpointer else None
            if start is not None and not checkpointer.has_optimizer_state(start):
                # Parameters only (maxllm.import_hf): start training from them.
                source, start = f"{checkpointer.directory}/{start}", None
            else:
                source = cfg.train.init_from
            if start is None:
                start = 0
                state = spec.init() if source is None else _state_from_weights(cfg, spec, source)
            else:
                _check_reference_state(cfg, checkpointer, start)
                start, state = checkpointer.restore_newest(spec.abstract)
                log.info("resumed from checkpoint step %d in %s", start, checkpointer.directory)
            if cfg.train.objective == "dpo" and cfg.dpo.precompute_ref:
                from maxllm.posttrain.train import reference_logps

                data.start(reference_logps(cfg, spec, state["params"], data, fresh=start == 0))
            if start > 0:
                data.restore(start, _item_reader(checkpointer, start))
            _log_params(cfg, state["params"])
            state, history, preempted = _loop(cfg, state, step_fn, data, checkpointer, start, evaluator)
        finally:
            if checkpointer is not None:
                checkpointer.close()
    if preempted:
        raise Preempted()
    samples = _sample(cfg, spec.graphdef, state["params"], data.tokenizer)
    return RunResult(history, state, spec.graphdef, start, samples)


def input_layout(cfg: Config, mesh: Mesh) -> NamedSharding:
    """The sharding of a step's (B, T) input arrays, after checking that the batch,
    its accumulation microbatches and their pipeline microbatches all split over
    the batch axes, and rows into the chunks of context parallelism (a
    ShardingError or ConfigError naming the keys if not)."""
    rules = cfg.mesh.rules.activations
    B, T = cfg.train.global_batch_size, cfg.data.seq_len
    rows = B // cfg.train.grad_accum_steps
    batch_sharding(rules, mesh, (rows, T))
    shards = _balanced_shards(cfg, rules, mesh)
    if T % (2 * shards):
        raise ShardingError(f"data.seq_len={T} must be a multiple of 2 x mesh.sequence ({2 * shards}): "
                            "each device takes an early and a late chunk of every row")
    stages = mesh.shape["stage"]
    if stages > 1:
        rows *= 2 if cfg.train.objective == "dpo" else 1  # a pair is two rows
        problem = pipeline.check(cfg.model.num_layers, rows, stages, cfg.train.microbatches,
                                 cfg.train.pipeline_repeats)
        if problem:
            raise ConfigError(problem)
        m = cfg.train.microbatches or stages
        try:
            batch_sharding(rules, mesh, (rows // m, T))
        except ShardingError as e:
            raise ShardingError(f"a pipeline microbatch ({rows} rows / train.microbatches={m}): {e}") from None
    return batch_sharding(rules, mesh, (B, T))


@contextlib.contextmanager
def step_context(cfg: Config, mesh: Mesh) -> Iterator[None]:
    """What the step is traced under: the mesh, the activation rules and the
    pipeline schedule."""
    with (jax.set_mesh(mesh), activation_rules(cfg.mesh.rules.activations, mesh),
          pipeline.schedule(cfg.train.microbatches, cfg.train.pipeline_repeats)):
        yield


def _train_input(cfg: Config, input_sharding: NamedSharding) -> data_lib.TrainInput:
    if cfg.train.objective == "pretrain":
        return data_lib.TrainInput(cfg, input_sharding)
    from maxllm.posttrain.train import posttrain_input

    return posttrain_input(cfg, input_sharding)


def _evaluator(cfg: Config, spec: TrainStateSpec, mesh: Mesh, input_sharding, data) -> Callable | None:
    """params -> the evaluation metrics: held-out loss and perplexity (data.eval_path;
    for DPO, the preference metrics of held-out pairs) and the `eval.tasks`, as
    `eval/<task>/<metric>`; None when there is nothing to evaluate. Tasks are read
    (and checked) now, before the first step."""
    parts = []
    tokenizer = data.tokenizer
    if cfg.data.eval_path and cfg.train.objective != "pretrain":
        from maxllm.posttrain.train import posttrain_evaluator

        parts.append(posttrain_evaluator(cfg, spec, data))
    elif cfg.data.eval_path:
        eval_input = data_lib.EvalInput(cfg, input_sharding)
        eval_step = make_eval_step(spec.graphdef, spec.shardings["params"], input_sharding)
        parts.append(lambda state: evaluate(eval_step, state["params"], eval_input))
    if cfg.eval.tasks:
        from maxllm.eval import LanguageModel, evaluate_tasks, load_tasks
        from maxllm.eval.tasks import METRICS

        if tokenizer is None:
            raise data_lib.DataError("eval.tasks need the data's tokenizer (data.tokenizer or a tokens/ manifest)")
        tasks = [task for name in cfg.eval.tasks for task in load_tasks(name, cfg.eval.limit)]
        lm = LanguageModel(spec.graphdef, None, cfg, tokenizer, cfg.eval.batch_size,
                           batch_multiple=axis_size("batch", cfg.mesh.rules.activations, mesh))

        def run_tasks(state):
            lm.params = state["params"]
            start = time.perf_counter()
            results = evaluate_tasks(lm, tasks, cfg.eval.num_fewshot, cfg.eval.limit, cfg.eval.seed)
            out = {f"eval/{name}/{m}": float(r[m]) for name, r in results.items() for m in METRICS if m in r}
            return {**out, "eval/seconds": time.perf_counter() - start}

        parts.append(run_tasks)
    if not parts:
        return None
    return lambda state: {k: v for part in parts for k, v in part(state).items()}


def _state_from_weights(cfg: Config, spec: TrainStateSpec, source: str) -> State:
    """Step 0 with the parameters of `source` (a run or checkpoint directory, or an
    HF folder) and a fresh optimizer state."""
    from maxllm.hf import load_params

    params = load_params(source, cfg.model, spec.shardings["params"])
    log.info("starting from the weights in %s (fresh optimizer state, step 0)", source)
    return jax.jit(lambda p: fresh_state(cfg, spec.tx, p), out_shardings=spec.shardings)(params)


def _check_reference_state(cfg: Config, checkpointer: Checkpointer, step: int) -> None:
    """A checkpoint holds a frozen DPO reference exactly when this config keeps one."""
    saved = checkpointer.has_state_key(step, "ref_params")
    if saved != uses_frozen_reference(cfg):
        held = "holds a frozen reference (ref_params)" if saved else "holds no frozen reference"
        wants = ("train.objective=dpo with dpo.precompute_ref=false" if uses_frozen_reference(cfg)
                 else f"train.objective={cfg.train.objective}, dpo.precompute_ref={cfg.dpo.precompute_ref}")
        raise ConfigError(f"{checkpointer.directory}/{step}: the checkpoint {held}, but this run has {wants}; "
                          "resume with the settings it was written with, or start a new run.output_dir")


def _item_reader(checkpointer: Checkpointer, step: int):
    if not checkpointer.has_item(step, "data"):
        return None
    return lambda name, args: checkpointer.read_item(step, name, args)


def _loop(cfg, state, step_fn, data, checkpointer, start, evaluator=None) -> tuple[State, dict, bool]:
    """Steps from `start` to `train.steps`; returns the state, the metrics by step,
    and whether a preemption stopped it (after saving). `evaluator(state)`, when
    given, runs every `eval.every_steps` and after the last step; its metrics join
    that step's, which is then logged whatever the logging cadence."""
    rows = cfg.train.global_batch_size * (2 if cfg.train.objective == "dpo" else 1)  # DPO: a pair is two rows
    writer = MetricsWriter(cfg.run.output_dir, cfg.logging.jsonl, cfg.logging.tensorboard, resume_step=start)
    throughput = _Throughput(cfg, rows * cfg.data.seq_len, len(data.sharding.mesh.devices.flat))
    history: dict[int, dict[str, float]] = {}
    pending: tuple[int, dict] | None = None

    bad_in_a_row = 0

    def flush():
        nonlocal bad_in_a_row
        step, metrics = pending
        history[step] = _scalars(jax.device_get(metrics))
        bad_in_a_row = bad_in_a_row + 1 if history[step]["skipped"] else 0
        if bad_in_a_row:
            log.warning("step %d: loss or gradient is not finite (loss %s, grad norm %s); update skipped (%d in a row)",
                        step, history[step]["loss"], history[step]["grad_norm"], bad_in_a_row)
        evaluated = any(key.startswith("eval") for key in history[step])
        if step % cfg.logging.every_steps == 0 or step == cfg.train.steps or evaluated or bad_in_a_row:
            writer.write(step, {**history[step], **throughput.measure(step)})
        if bad_in_a_row >= cfg.train.max_bad_steps:
            raise BadSteps(f"step {step}: the loss or gradient was NaN or Inf for {bad_in_a_row} steps in a row "
                           f"(steps {step - bad_in_a_row + 1}-{step}, train.max_bad_steps={cfg.train.max_bad_steps}); "
                           "none of them updated the state, so every checkpoint holds finite values. Lower "
                           "train.lr, raise train.warmup_steps, or check the data")

    with writer, _Preemption() as preemption:
        for step in range(start, cfg.train.steps):
            batch = data.next()
            state, metrics = step_fn(state, batch)
            done = step + 1
            if step == start:  # the first step includes compilation: time from its end
                jax.block_until_ready(metrics)
                throughput.start(done)
            if pending is not None:
                flush()  # the previous step's metrics, read while this one runs
            pending = (done, metrics)
            every = cfg.eval.every_steps
            if evaluator is not None and (done == cfg.train.steps or (every and done % every == 0)):
                pending = (done, {**metrics, **evaluator(state)})
            stop = preemption.stop_at(done)
            if checkpointer is not None and (checkpointer.should_save(done) or done == cfg.train.steps or stop):
                checkpointer.save(done, state, force=stop, extra=data.save_args())
            if stop:
                if checkpointer is not None:
                    checkpointer.wait()
                log.warning("stopped by SIGTERM after step %d; %s", done,
                            "checkpoint saved" if checkpointer else "checkpointing is off, nothing saved")
                break
        if pending is not None:
            flush()
    return state, history, preemption.received


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Float metrics; a vector (Mixtral's per-expert load) becomes one key per entry."""
    out = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[key] = float(value)
        else:
            out.update({f"{key}/{i}": float(v) for i, v in enumerate(value.reshape(-1))})
    return out


class BadSteps(ConfigError):
    """Too many steps in a row with a non-finite loss or gradient; `main` exits 2."""


class Preempted(Exception):
    """Raised after a SIGTERM was handled; `main` turns it into exit code 0."""


def _log_params(cfg: Config, params: dict) -> None:
    active = param_count(cfg.model, active=True)
    total = param_count(cfg.model)
    per_token = f" ({active / 1e6:.2f}M active per token)" if active != total else ""
    log.info("model: %s, %.2fM parameters%s", cfg.model.family, total / 1e6, per_token)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(k.key) for k in path)
        log.info("  %-28s %-22s %s", name, str(tuple(leaf.shape)), leaf.sharding.spec)


def _sample(cfg: Config, graphdef, params, tokenizer) -> list[str]:
    if not cfg.sample.prompts or tokenizer is None:
        return []
    prompts = [tokenizer.encode(p) for p in cfg.sample.prompts]
    outs = greedy_generate(
        graphdef, params, prompts, cfg.sample.max_new_tokens, cfg.model.max_seq_len, tokenizer.eos_id
    )
    texts = [tokenizer.decode(ids) for ids in outs]
    if jax.process_index() == 0:
        print("\ngreedy continuations:")
        for prompt, text in zip(cfg.sample.prompts, texts):
            print(f"  {prompt!r} -> {text!r}")
    return texts


# ---------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maxllm.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile the step and print parameters, FLOPs and memory per device; run nothing")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    log_to_stderr("maxllm")
    try:
        cfg = load_config(args.config, args.overrides)
        maybe_initialize_distributed()
        if args.dry_run:
            from maxllm.plan import main as dry_run

            dry_run(cfg)
            return 0
        train(cfg)
    except (ConfigError, data_lib.DataError, HFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
