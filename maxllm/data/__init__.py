"""Training input: what `maxllm.train` reads each step, as global `jax.Array`s.

`TrainInput` wraps one of:
- the Grain pipeline (`data.source` = `tokens`, `mixture`, `text`, `seqio`):
  stateful, one disjoint shard per group of processes holding the same batch rows,
  its iterator state saved in the same Orbax checkpoint as the model;
- the synthetic source: every row a pure function of (seed, step, row), the same
  whatever the process layout (used for sharding and multi-host parity tests).

A batch is a dict of (B, T) arrays: inputs, targets, positions, segment_ids,
loss_mask (see `maxllm.data.pipeline`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from maxllm import storage
from maxllm.config import Config, DataConfig
from maxllm.data import pipeline as pl
from maxllm.data.sources import DataError, Manifest, jsonl_documents, token_shards
from maxllm.data.synthetic import SyntheticRows
from maxllm.tokenizer import Tokenizer, TokenizerError

__all__ = ["BATCH_KEYS", "DataError", "TrainInput", "EvalInput", "global_batch", "process_rows", "open_tokenizer"]

BATCH_KEYS = pl.BATCH_KEYS

Batch = dict[str, np.ndarray]


def process_rows(sharding: jax.sharding.NamedSharding, shape: tuple[int, int]) -> tuple[slice, slice, pl.Layout]:
    """This process's rows and columns of a global batch, and its data shard: the
    processes holding the same rows (e.g. split along the sequence) read the same
    shard; each distinct row block gets its own."""
    blocks_by_process: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        blocks_by_process.setdefault(device.process_index, set()).add(index[0].indices(shape[0])[:2])
    rows = {p: _contiguous(sorted(b), p, 0) for p, b in blocks_by_process.items()}
    me = jax.process_index()
    distinct = sorted(set(rows.values()))
    local_cols = [ix[1].indices(shape[1])[:2] for ix in sharding.addressable_devices_indices_map(shape).values()]
    cols = _contiguous(sorted(set(local_cols)), me, 1)
    start, stop = rows[me]
    layout = pl.Layout(rows=stop - start, shard_index=distinct.index(rows[me]), shard_count=len(distinct))
    return slice(start, stop), slice(*cols), layout


def _contiguous(pieces: list[tuple[int, int]], process: int, dim: int) -> tuple[int, int]:
    for (_, stop), (start, _) in zip(pieces, pieces[1:]):
        if stop != start:
            raise DataError(
                f"process {process} holds non-adjacent parts {pieces} of batch dimension {dim}; "
                "order the mesh so each process's devices hold one block"
            )
    return pieces[0][0], pieces[-1][1]


def global_batch(local: dict[str, np.ndarray], shardings: dict[str, jax.sharding.NamedSharding],
                 shape: tuple[int, int], cols: slice) -> dict[str, jax.Array]:
    """Global arrays of `shape[0]` rows from this process's rows, keeping its columns
    of the length axis (the last, for (B, T) and DPO's (B, 2, T) arrays)."""
    out = {}
    for key, sharding in shardings.items():
        value = local[key]
        if key in BATCH_KEYS:
            value = value[..., cols]
        out[key] = jax.make_array_from_process_local_data(sharding, value, (shape[0], *local[key].shape[1:]))
    return out


def open_tokenizer(cfg: DataConfig, model_vocab: int) -> Tokenizer | None:
    """The data's tokenizer (data.tokenizer, else the manifest's), checked against
    the model's vocabulary."""
    path = cfg.tokenizer
    if path is None and cfg.source in ("tokens", "mixture"):
        path = str(Manifest.read(cfg.path if cfg.source == "tokens" else cfg.mixture[0].path).tokenizer)
    if path is None:
        return None
    try:
        tokenizer = Tokenizer.load(path)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    if tokenizer.vocab_size > model_vocab:
        raise DataError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {model_vocab}")
    return tokenizer


def is_token_folder(path: str) -> bool:
    return storage.isdir(path) or path.rsplit("/", 1)[-1] == "manifest.json"


def _map_documents(cfg: DataConfig, model_vocab: int, path: str | None = None) -> tuple[list[grain.MapDataset], list[float] | None]:
    """The random-access document datasets (and mixture weights) of `cfg`, or of
    `path` alone (the eval split): a tokens/ folder or text files."""
    if cfg.source == "mixture" and path is None:
        manifests = [_manifest(m.path, model_vocab) for m in cfg.mixture]
        tokenizers = {m.tokenizer_sha256 for m in manifests}
        if len(tokenizers) > 1:
            raise DataError("data.mixture: the datasets use different tokenizers (" + ", ".join(str(m.tokenizer) for m in manifests) + ")")
        return [token_shards(m) for m in manifests], [m.weight for m in cfg.mixture]
    path = path or cfg.path
    if is_token_folder(path):
        return [token_shards(_manifest(path, model_vocab))], None
    if not cfg.tokenizer:
        raise DataError(f"{path}: text data needs data.tokenizer (a sentencepiece .model or tokenizer.json)")
    return [jsonl_documents(path, cfg.text_field, cfg.tokenizer, cfg.add_eos)], None


def _manifest(path: str, model_vocab: int) -> Manifest:
    manifest = Manifest.read(path)
    if manifest.vocab_size > model_vocab:
        raise DataError(
            f"{manifest.tokenizer}: the tokenizer of {path} has {manifest.vocab_size} tokens "
            f"but model.vocab_size is {model_vocab}"
        )
    return manifest


class TrainInput:
    """Global batches for training, and the checkpointable state behind them."""

    def __init__(self, cfg: Config, sharding: jax.sharding.NamedSharding):
        d = cfg.data
        self.shape = (cfg.train.global_batch_size, d.seq_len)
        self.sharding = sharding
        self.shardings = dict.fromkeys(BATCH_KEYS, sharding)  # per batch key, as the train step takes them
        self.rows, self.cols, self.layout = process_rows(sharding, self.shape)
        self.tokenizer = open_tokenizer(d, cfg.model.vocab_size)
        self.synthetic = d.source == "synthetic"
        self.step = 0
        if self.synthetic:
            self._rows = SyntheticRows(d.seq_len, cfg.model.vocab_size, cfg.train.seed)
            return
        seed = cfg.train.seed
        if d.source == "seqio":
            from maxllm.data.seqio_source import seqio_documents

            docs = seqio_documents(
                d.seqio, shard_index=self.layout.shard_index, shard_count=self.layout.shard_count,
                seed=seed, shuffle=d.shuffle, num_epochs=None, model_vocab=cfg.model.vocab_size,
            )
        else:
            documents, weights = _map_documents(d, cfg.model.vocab_size)
            docs = pl.document_stream(documents, weights, layout=self.layout, seed=seed, shuffle=d.shuffle, num_epochs=None)
        dataset = pl.packed_batches(
            docs, seq_len=d.seq_len, rows=self.layout.rows, seed=seed, packing=d.packing,
            packing_bins=d.packing_bins, shuffle=d.shuffle, shuffle_window=d.shuffle_window, drop_remainder=True,
            num_workers=0 if d.source == "seqio" else d.num_workers,  # TF does not survive fork
        )
        self.iterator: grain.DatasetIterator = iter(dataset)

    def next(self) -> dict[str, jax.Array]:
        """The next global batch (this process builds its rows only)."""
        if self.synthetic:
            local = self._rows.rows(self.step, self.rows.start, self.rows.stop)
        else:
            local = pl.to_model_batch(next(self.iterator))
        self.step += 1
        return global_batch(local, self.shardings, self.shape, self.cols)

    # Checkpointing: the iterator state, plus the layout it is only valid for.

    def layout_json(self) -> dict[str, Any]:
        return {"process_count": jax.process_count(), **self.layout.to_json()}

    def save_args(self) -> dict[str, Any]:
        """Checkpoint items for the state after the batches read so far."""
        state = {"step": self.step} if self.synthetic else self.iterator.get_state()
        return {
            "data": grain.checkpoint.CheckpointSave(pl.StateSnapshot(state)),
            "data_layout": ocp.args.JsonSave(self.layout_json()),
        }

    def restore(self, step: int, read_item: Callable[[str, Any], Any] | None) -> None:
        """Continues after training step `step`. `read_item(name, args)` reads an
        item of the checkpoint (None: the checkpoint has no data items). The
        synthetic source needs only the step; a Grain iterator is valid only for
        the process layout it was saved with, so a different one is an error, not
        a silent replay or skip of data."""
        self.step = step
        if self.synthetic:
            return
        if read_item is None:
            raise DataError(
                f"the checkpoint at step {step} has no data iterator state; "
                "resume it with data.source=synthetic, or start a new run.output_dir"
            )
        saved = read_item("data_layout", ocp.args.JsonRestore())
        now = self.layout_json()
        if saved != now:
            raise DataError(
                f"the checkpoint's data iterator was saved with {saved}, this run has {now}; "
                "resume with the same number of processes and the same mesh and batch size "
                "(or start a new run.output_dir)"
            )
        read_item("data", grain.checkpoint.CheckpointRestore(self.iterator))

    @staticmethod
    def handlers() -> dict[str, Any]:
        return {"data": grain.checkpoint.CheckpointHandler(), "data_layout": ocp.JsonCheckpointHandler()}


class EvalInput:
    """The held-out split (`data.eval_path`) in a fixed order: no shuffle, one
    pass, the last batch padded with empty rows (loss mask 0). Every process packs
    the same full batches and keeps its rows, so all processes see the same number
    of batches. Each call of `batches()` starts from the beginning."""

    def __init__(self, cfg: Config, sharding: jax.sharding.NamedSharding, batch_size: int | None = None):
        d = cfg.data
        if not d.eval_path:
            raise DataError("data.eval_path is not set")
        self.shape = (batch_size or cfg.train.global_batch_size, d.seq_len)
        self.sharding = sharding
        self.rows, self.cols, _ = process_rows(sharding, self.shape)
        documents, _ = _map_documents(d, cfg.model.vocab_size, d.eval_path)
        docs = pl.document_stream(documents, None, layout=pl.Layout(self.shape[0], 0, 1), seed=0, shuffle=False, num_epochs=1)
        self.dataset = pl.packed_batches(
            docs, seq_len=d.seq_len, rows=self.shape[0], seed=0, packing=d.packing,
            packing_bins=d.packing_bins, shuffle=False, drop_remainder=False, num_workers=0,
        )

    def batches(self) -> Iterator[dict[str, jax.Array]]:
        for packed in self.dataset:
            local = {k: v[self.rows] for k, v in pl.to_model_batch(packed).items()}
            yield global_batch(local, dict.fromkeys(BATCH_KEYS, self.sharding), self.shape, self.cols)
