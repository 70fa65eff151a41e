"""What `maxllm.train` adds for `train.objective: sft | dpo`: the tokenizer and chat
template of the run, its input, the precomputed reference log-probabilities, and
held-out evaluation of fine-tuning records."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from maxllm import data as data_lib
from maxllm import storage
from maxllm.config import Config
from maxllm.posttrain.chat import TEMPLATE_FILE, ChatTemplate, TemplateError, find_run_dir, resolve_template
from maxllm.posttrain.dpo import METRICS, SEQUENCE_KEYS, dpo_losses, pair_logps
from maxllm.posttrain.input import PosttrainInput, check_reference, pair_batches, read_examples, reference_file
from maxllm.tokenizer import Tokenizer

log = logging.getLogger("maxllm.posttrain")


def run_tokenizer(cfg: Config) -> Tokenizer:
    """`data.tokenizer`, else the tokenizer of `train.init_from`: an HF folder's, or
    the one a run directory trained with."""
    if cfg.data.tokenizer:
        return data_lib.open_tokenizer(cfg.data, cfg.model.vocab_size)
    from maxllm.hf import HFError, is_hf_folder
    from maxllm.hf.convert import run_config

    path = Path(cfg.train.init_from)
    if is_hf_folder(path):
        source = cfg.data.model_copy(update={"tokenizer": str(path)})
    else:
        run_dir = find_run_dir(path)
        if run_dir is None:
            raise data_lib.DataError(f"{path}: no config.yml here or above it, nor an HF folder; set data.tokenizer")
        try:
            source = run_config(run_dir).data
        except HFError as e:
            raise data_lib.DataError(str(e)) from None
    tokenizer = data_lib.open_tokenizer(source, cfg.model.vocab_size)
    if tokenizer is None:
        raise data_lib.DataError(f"{path}: brings no tokenizer; set data.tokenizer")
    log.info("tokenizer %s (from train.init_from)", tokenizer.path)
    return tokenizer


def run_template(cfg: Config, tokenizer: Tokenizer) -> tuple[ChatTemplate | None, str | None]:
    """The run's chat template, saved as <run.output_dir>/chat_template.jinja for
    the export; or (None, why there is none), which only records with messages
    turn into an error. A template named in the config that cannot be used is an
    error at once."""
    from maxllm.posttrain.records import TextEncoder

    try:
        source, origin = resolve_template(cfg.posttrain.chat_template, tokenizer_path=tokenizer.path,
                                          init_from=cfg.train.init_from)
        encoder = TextEncoder(tokenizer)
        template = ChatTemplate(source, bos_token=encoder.bos_token, eos_token=encoder.eos_token)
    except TemplateError as e:
        if cfg.posttrain.chat_template is not None:
            raise data_lib.DataError(str(e)) from None
        return None, str(e)
    log.info("chat template: %s", origin)
    if jax.process_index() == 0:
        storage.write_text(storage.join(cfg.run.output_dir, TEMPLATE_FILE), source)  # atomic: never half a file
    return template, None


def posttrain_input(cfg: Config, sharding: NamedSharding) -> PosttrainInput:
    tokenizer = run_tokenizer(cfg)
    template, missing = run_template(cfg, tokenizer)
    return PosttrainInput(cfg, sharding, tokenizer, template, missing)


# ---------------------------------------------------------------------------------
# Reference log-probs and evaluation


def _pair_scorer(cfg: Config, spec, data: PosttrainInput) -> Callable:
    """(params, pairs in order) -> their sequence log-probs (N, 2), batch by batch
    (the forward the DPO step uses for its frozen reference). One per run: the
    reference pass and the held-out evaluation share its compilation."""
    if data.scorer is None:
        data.scorer = _build_pair_scorer(cfg, spec, data)
    return data.scorer


def _build_pair_scorer(cfg: Config, spec, data: PosttrainInput) -> Callable:
    shardings = {k: data.shardings[k] for k in SEQUENCE_KEYS}
    replicated = NamedSharding(data.sharding.mesh, PartitionSpec())
    average = cfg.dpo.loss_type == "ipo"
    fn = jax.jit(lambda p, b: pair_logps(spec.graphdef, p, b, average=average, train=False)[0],
                 in_shardings=(spec.shardings["params"], shardings), out_shardings=replicated)

    def score(params, examples: list[dict]) -> np.ndarray:
        out = []
        for batch, real in pair_batches(examples, data.shape[0], data.shape[1]):
            local = {k: v[data.rows] for k, v in batch.items()}
            out.append(np.asarray(fn(params, data_lib.global_batch(local, shardings, data.shape, data.cols)))[:real])
        return np.concatenate(out)

    return score


def reference_logps(cfg: Config, spec, params, data: PosttrainInput, *, fresh: bool) -> np.ndarray:
    """The reference's log-probs of every training pair (and held-out pair),
    computed from the starting `params` on a fresh run and saved in the run
    directory; read back when the run resumes."""
    path = reference_file(cfg.run.output_dir)
    eval_path = reference_file(cfg.run.output_dir, "ref_logps_eval.npy")
    if not fresh:
        if data.eval_examples is not None:
            data.eval_ref = _read_saved(eval_path, len(data.eval_examples))
        return _read_saved(path, len(data.examples))
    start = time.perf_counter()
    score = _pair_scorer(cfg, spec, data)
    ref = score(params, data.examples)
    if data.eval_examples is not None:
        data.eval_ref = score(params, data.eval_examples)
    if jax.process_index() == 0:
        _save_npy(path, ref)
        if data.eval_ref is not None:
            _save_npy(eval_path, data.eval_ref)
    log.info("reference log-probs of %d pairs computed in %.1fs (dpo.precompute_ref), saved to %s",
             len(ref), time.perf_counter() - start, path)
    return ref


def _read_saved(path: str, pairs: int) -> np.ndarray:
    """Process 0 reads the file in its run directory; every process gets its values."""
    from jax.experimental import multihost_utils

    mine = check_reference(path, pairs) if jax.process_index() == 0 else np.zeros((pairs, 2), np.float32)
    return np.asarray(multihost_utils.broadcast_one_to_all(mine))


def _save_npy(path: str, array: np.ndarray) -> None:
    with storage.atomic_write(path) as f:  # never a half-written file under the real name
        np.save(f, array)


def posttrain_evaluator(cfg: Config, spec, data: PosttrainInput) -> Callable:
    """state -> held-out metrics of `data.eval_path`: SFT's loss on the learned
    tokens (`eval_loss`, `eval_perplexity`, `eval_tokens`), or DPO's loss and
    preference metrics (`eval_loss`, `eval_rewards/accuracies`, ...)."""
    if cfg.train.objective == "sft":
        from maxllm.posttrain.input import SFTEvalInput
        from maxllm.train import evaluate, make_eval_step

        eval_input = SFTEvalInput(cfg, data)
        eval_step = make_eval_step(spec.graphdef, spec.shardings["params"], data.sharding)
        return lambda state: evaluate(eval_step, state["params"], eval_input)

    data.eval_examples = read_examples(cfg, cfg.data.eval_path, data.tokenizer, data.template, data.missing_template)
    score = _pair_scorer(cfg, spec, data)

    def run(state) -> dict[str, float]:
        policy = score(state["params"], data.eval_examples)
        if data.eval_ref is None:  # frozen reference: scored once, it never changes
            data.eval_ref = score(state["ref_params"], data.eval_examples)
        ref = data.eval_ref
        losses, metrics = dpo_losses(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=cfg.dpo.beta,
                                     loss_type=cfg.dpo.loss_type, label_smoothing=cfg.dpo.label_smoothing)
        out = {"eval_loss": float(np.mean(losses))}
        out.update({f"eval_{k}": float(np.mean(metrics[k])) for k in METRICS})
        return out

    return run
