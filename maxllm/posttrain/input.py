"""Fine-tuning input: the records of `data.path` as global batches.

SFT batches are the pre-training batch (inputs, targets, positions, segment_ids,
loss_mask of shape (B, T)), with the loss mask on the learned tokens only. With
`posttrain.packing`, examples are packed first-fit into rows; segment ids keep
their attention apart and positions restart at 0 in each, so a packed example
computes exactly what it would alone. DPO batches hold B pairs as (B, 2, T)
arrays, one sequence per row (chosen first), plus `ref_logps` (B, 2) when the
reference log-probabilities are precomputed.

The records are read and checked when the run starts (all of them: fine-tuning
sets are small next to pre-training corpora), then shuffled per epoch, sharded by
process and packed by the same Grain pipeline as pre-training, whose iterator
state goes into the checkpoint.
"""

from __future__ import annotations

import io
import logging

import grain
import grain.experimental as gx
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from maxllm import storage
from maxllm.config import Config
from maxllm.data import TrainInput, global_batch, pipeline as pl, process_rows
from maxllm.data.sources import DataError
from maxllm.posttrain.chat import ChatTemplate
from maxllm.posttrain.dpo import SEQUENCE_KEYS
from maxllm.posttrain.records import Reader, TextEncoder, read_records
from maxllm.tokenizer import Tokenizer

log = logging.getLogger("maxllm.posttrain")


def read_examples(cfg: Config, path: str, tokenizer: Tokenizer, template: ChatTemplate | None,
                  missing_template: str | None = None) -> list[dict]:
    """The objective's records at `path`, tokenized and checked."""
    reader = Reader(TextEncoder(tokenizer), template, cfg.data.seq_len, missing_template)
    convert = reader.sft if cfg.train.objective == "sft" else reader.preference
    examples = read_records(path, convert, skip_bad=cfg.posttrain.skip_bad_records)
    masks = [v for e in examples for k, v in e.items() if k.endswith("loss_mask")]
    log.info("%s: %d %s, %d tokens, %d of them learned; the longest sequence has %d (data.seq_len=%d)", path,
             len(examples), "examples" if cfg.train.objective == "sft" else "preference pairs",
             sum(len(m) for m in masks), sum(int(m.sum()) for m in masks), max(len(m) for m in masks),
             cfg.data.seq_len)
    return examples


class PosttrainInput(TrainInput):
    """`TrainInput` (same batches interface and checkpointed iterator state) over
    the fine-tuning records."""

    def __init__(self, cfg: Config, sharding: NamedSharding, tokenizer: Tokenizer, template: ChatTemplate | None,
                 missing_template: str | None = None):
        self.cfg = cfg
        self.objective = cfg.train.objective
        self.shape = (cfg.train.global_batch_size, cfg.data.seq_len)
        self.sharding = sharding
        self.rows, self.cols, self.layout = process_rows(sharding, self.shape)
        self.tokenizer = tokenizer
        self.synthetic = False
        self.step = 0
        self.template, self.missing_template = template, missing_template
        self.examples = read_examples(cfg, cfg.data.path, tokenizer, template, missing_template)
        self.eval_examples: list[dict] | None = None  # DPO: held-out pairs (data.eval_path)
        self.eval_ref: np.ndarray | None = None  # and their precomputed reference log-probs
        self.scorer = None  # DPO: the jitted pair scorer (maxllm.posttrain.train), built once
        self.shardings = batch_shardings(cfg, sharding)
        self.iterator = None
        if self.objective == "sft" or not cfg.dpo.precompute_ref:
            self.start()

    def start(self, ref_logps: np.ndarray | None = None) -> None:
        """Builds the pipeline; `ref_logps` (N, 2) are the precomputed reference
        log-probabilities of the N pairs, in record order."""
        d = self.cfg.data
        seed = self.cfg.train.seed
        source = grain.MapDataset.source(self.examples)
        docs = pl.document_stream([source], None, layout=self.layout, seed=seed, shuffle=d.shuffle, num_epochs=None)
        rows = self.layout.rows
        if self.objective == "dpo":
            dataset = docs.map(PadPair(d.seq_len, ref_logps)).batch(rows)
        else:
            dataset = sft_rows(docs, self.cfg, rows, seed, shuffle=d.shuffle).batch(rows)
        self.iterator = iter(gx.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=2))

    def next(self) -> dict[str, jax.Array]:
        if self.iterator is None:
            raise RuntimeError("PosttrainInput.start() was not called (precomputed reference log-probs)")
        local = next(self.iterator)
        self.step += 1
        return global_batch(local, self.shardings, self.shape, self.cols)


class SFTEvalInput:
    """Held-out SFT records (`data.eval_path`) as pre-training's `EvalInput` gives
    its split: fixed order, one pass, packed like training, the last batch padded
    with empty rows."""

    def __init__(self, cfg: Config, data: PosttrainInput):
        self.data = data
        examples = read_examples(cfg, cfg.data.eval_path, data.tokenizer, data.template, data.missing_template)
        rows = data.shape[0]
        docs = grain.MapDataset.source(examples).to_iter_dataset()
        self.dataset = sft_rows(docs, cfg, rows, seed=0, shuffle=False).batch(
            rows, drop_remainder=False, batch_fn=pl._StackAndPad(rows))

    def batches(self):
        for local in self.dataset:
            local = {k: v[self.data.rows] for k, v in local.items()}
            yield global_batch(local, self.data.shardings, self.data.shape, self.data.cols)


def sft_rows(examples: grain.IterDataset, cfg: Config, rows: int, seed: int, shuffle: bool) -> grain.IterDataset:
    """SFT examples as rows of the train step's batch: packed first-fit
    (`posttrain.packing`), else one example per row."""
    T = cfg.data.seq_len
    if not cfg.posttrain.packing:
        return examples.map(PadRow(T))
    packed = gx.FirstFitPackIterDataset(
        examples.map(_sequence), length_struct={k: T for k in ("inputs", "targets", "loss_mask")},
        num_packing_bins=cfg.data.packing_bins or 4 * rows, seed=seed, shuffle_bins=shuffle,
    )
    return packed.map(pl.to_model_batch)


def batch_shardings(cfg: Config, sharding: NamedSharding) -> dict[str, NamedSharding]:
    """Each batch key's sharding: (B, T) like pre-training; DPO's (B, 2, T)
    sequences and (B, 2) reference log-probs split along B the same way."""
    if cfg.train.objective != "dpo":
        return dict.fromkeys(SEQUENCE_KEYS, sharding)
    rows, length = sharding.spec
    out = dict.fromkeys(SEQUENCE_KEYS, NamedSharding(sharding.mesh, PartitionSpec(rows, None, length)))
    if cfg.dpo.precompute_ref:
        out["ref_logps"] = NamedSharding(sharding.mesh, PartitionSpec(rows, None))
    return out


# ---------------------------------------------------------------------------------
# Per-example maps (module level: picklable)


def _sequence(example: dict) -> dict:
    return {k: example[k] for k in ("inputs", "targets", "loss_mask")}


def pad_sequence(inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """One sequence alone in a row of `length`, padding after it (segment 0)."""
    n = len(inputs)
    row = {
        "inputs": np.zeros(length, np.int32), "targets": np.zeros(length, np.int32),
        "positions": np.zeros(length, np.int32), "segment_ids": np.zeros(length, np.int32),
        "loss_mask": np.zeros(length, np.float32),
    }
    row["inputs"][:n], row["targets"][:n], row["loss_mask"][:n] = inputs, targets, mask
    row["positions"][:n] = np.arange(n)
    row["segment_ids"][:n] = 1
    return row


class PadRow:
    def __init__(self, length: int):
        self.length = length

    def __call__(self, example: dict) -> dict:
        return pad_sequence(example["inputs"], example["targets"], example["loss_mask"], self.length)


class PadPair:
    """A preference pair as (2, T) arrays, chosen first; with the reference's
    log-probs of that pair when they were precomputed."""

    def __init__(self, length: int, ref_logps: np.ndarray | None):
        self.length = length
        self.ref_logps = ref_logps

    def __call__(self, example: dict) -> dict:
        rows = [pad_sequence(example[f"{a}_inputs"], example[f"{a}_targets"], example[f"{a}_loss_mask"], self.length)
                for a in ("chosen", "rejected")]
        out = {k: np.stack([r[k] for r in rows]) for k in SEQUENCE_KEYS}
        if self.ref_logps is not None:
            out["ref_logps"] = self.ref_logps[int(example["index"])].astype(np.float32)
        return out


def pair_batches(examples: list[dict], pairs_per_batch: int, length: int):
    """All pairs in record order, `pairs_per_batch` at a time (the last batch
    padded with copies of the first pair), and how many of each batch are real."""
    pad = PadPair(length, None)
    for start in range(0, len(examples), pairs_per_batch):
        chunk = [pad(e) for e in examples[start : start + pairs_per_batch]]
        real = len(chunk)
        chunk += [chunk[0]] * (pairs_per_batch - real)
        yield {k: np.stack([c[k] for c in chunk]) for k in SEQUENCE_KEYS}, real


def reference_file(out_dir: str, name: str = "ref_logps.npy") -> str:
    return storage.join(out_dir, name)


def check_reference(path: str, pairs: int) -> np.ndarray:
    """The saved reference log-probs of `pairs` pairs (a resumed run's)."""
    if not storage.isfile(path):
        raise DataError(f"{path}: missing; a resumed run with dpo.precompute_ref needs the reference log-probs "
                        "its first start computed (start a new run.output_dir)")
    try:
        with storage.open_read(path) as f:
            ref = np.load(io.BytesIO(f.read()))
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable ({e}); start a new run.output_dir") from None
    if ref.shape != (pairs, 2):
        raise DataError(
            f"{path}: holds reference log-probs for {ref.shape[0]} pairs, the data has {pairs}; "
            "the records changed since the run started (start a new run.output_dir)"
        )
    return ref
