"""Training batches for now: a synthetic source and a small real-text source.

Both are pure functions of (seed, step): a resumed run sees exactly the batches the
uninterrupted run would have seen, with no iterator state to save. Each process
builds only the rows its devices hold, then the rows become one global `jax.Array`
with the mesh's batch sharding. The Grain pipeline over ArrayRecord shards replaces
the text source in its own issue.

A batch is a dict of (B, T) arrays:
  inputs, targets     token ids; targets are inputs shifted left by one
  positions           position of each token inside its document, from 0
  segment_ids         1, 2, ... per document packed in the row; 0 is padding
  loss_mask           1.0 where the target belongs to the input's document
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from maxllm.config import DataConfig

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


class DataError(ValueError):
    """Unreadable training data; the message names the file and line."""


class Tokenizer:
    """A sentencepiece model behind the small interface training and sampling use."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        if not Path(path).is_file():
            raise DataError(f"{path}: tokenizer model not found")
        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str | list[str]) -> list[int] | list[list[int]]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class Source(Protocol):
    def rows(self, step: int, start: int, stop: int) -> Batch:
        """Rows [start, stop) of the global batch of `step`."""


# ---------------------------------------------------------------------------------
# Packing


def pack_window(window: np.ndarray, doc_ids: np.ndarray) -> Batch:
    """One row from T+1 consecutive tokens and the document id of each."""
    inputs, targets = window[:-1], window[1:]
    docs = doc_ids[:-1]
    starts = np.concatenate([[True], docs[1:] != docs[:-1]])
    segment_ids = np.cumsum(starts).astype(np.int32)
    first = np.maximum.accumulate(np.where(starts, np.arange(len(docs)), 0))
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "positions": (np.arange(len(docs)) - first).astype(np.int32),
        "segment_ids": segment_ids,
        "loss_mask": (doc_ids[1:] == docs).astype(np.float32),
    }


def _stack(rows: list[Batch]) -> Batch:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------------
# Sources


class SyntheticSource:
    """Packed rows of random documents, each a short random phrase repeated, so a
    model can learn them (induction) and the loss falls."""

    def __init__(self, cfg: DataConfig, vocab_size: int, seed: int):
        self.seq_len, self.vocab, self.seed = cfg.seq_len, vocab_size, seed

    def _row(self, step: int, row: int) -> Batch:
        rng = np.random.default_rng([self.seed, step, row])
        T = self.seq_len
        tokens, docs, doc = [], [], 0
        while len(tokens) < T + 1:
            length = int(rng.integers(T // 4 + 2, T + 2))
            phrase = rng.integers(1, self.vocab, size=int(rng.integers(2, 9)))
            tokens.extend(np.resize(phrase, length))
            docs.extend([doc] * length)
            doc += 1
        return pack_window(np.asarray(tokens[: T + 1]), np.asarray(docs[: T + 1]))

    def rows(self, step: int, start: int, stop: int) -> Batch:
        return _stack([self._row(step, r) for r in range(start, stop)])


class TextSource:
    """Documents from JSONL (optionally gzipped) or plain-text files, tokenized once,
    concatenated with EOS, cut into windows of seq_len + 1, shuffled per epoch."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, seed: int, batch_size: int):
        self.seq_len, self.seed, self.batch_size = cfg.seq_len, seed, batch_size
        docs = list(_read_documents(cfg))
        ids = tokenizer.encode(docs)
        if cfg.add_eos:
            ids = [d + [tokenizer.eos_id] for d in ids]
        self.tokens = np.concatenate([np.asarray(d, np.int32) for d in ids])
        self.doc_ids = np.repeat(np.arange(len(ids), dtype=np.int64), [len(d) for d in ids])
        self.num_windows = (len(self.tokens) - 1) // self.seq_len
        self._order: tuple[int, np.ndarray | None] = (-1, None)  # (epoch, permutation)
        if self.num_windows < 1:
            raise DataError(f"{cfg.path}: {len(self.tokens)} tokens, fewer than one row")
        log.info(
            "text source: %d documents, %d tokens, %d rows of %d",
            len(ids), len(self.tokens), self.num_windows, self.seq_len,
        )

    def window_index(self, step: int, row: int) -> int:
        """Which window row `row` of step `step` reads: global sample i = step * B + row
        goes to epoch i // W, and takes that epoch's permutation at i % W."""
        epoch, offset = divmod(step * self.batch_size + row, self.num_windows)
        if self._order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order = (epoch, order)
        return int(self._order[1][offset])

    def rows(self, step: int, start: int, stop: int) -> Batch:
        out = []
        for row in range(start, stop):
            begin = self.window_index(step, row) * self.seq_len
            sl = slice(begin, begin + self.seq_len + 1)
            out.append(pack_window(self.tokens[sl], self.doc_ids[sl]))
        return _stack(out)


def _read_documents(cfg: DataConfig):
    if not cfg.path:
        raise DataError("data.source=text needs data.path")
    files = sorted(glob.glob(cfg.path)) or [cfg.path]
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"{path}: data file not found (data.path={cfg.path!r})")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            if ".json" not in path.name:  # .json, .jsonl, .jsonl.gz: one JSON record a line
                yield f.read()
                continue
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                text = record.get(cfg.text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(
                        f"{path}:{lineno}: no string field {cfg.text_field!r} "
                        "(set data.text_field)"
                    )
                yield text


def make_source(cfg: DataConfig, vocab_size: int, seed: int, batch_size: int) -> tuple[Source, Tokenizer | None]:
    if cfg.source == "synthetic":
        return SyntheticSource(cfg, vocab_size, seed), None
    if not cfg.tokenizer:
        raise DataError("data.source=text needs data.tokenizer (a sentencepiece .model)")
    tokenizer = Tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"{cfg.tokenizer}: tokenizer has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size is {vocab_size}"
        )
    return TextSource(cfg, tokenizer, seed, batch_size), tokenizer


# ---------------------------------------------------------------------------------
# Host rows -> global arrays


def global_batch(source: Source, step: int, sharding: jax.sharding.NamedSharding, shape: tuple[int, int]) -> dict[str, jax.Array]:
    """The batch of `step` as global arrays; each process reads only its own rows."""
    rows, cols = _process_slice(sharding, shape)
    local = source.rows(step, rows.start, rows.stop)
    return {
        k: jax.make_array_from_process_local_data(sharding, v[:, cols], shape)
        for k, v in local.items()
    }


def _process_slice(sharding: jax.sharding.NamedSharding, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The rows and columns this process's devices hold; they must form one block."""
    index_map = sharding.addressable_devices_indices_map(shape)
    bounds = []
    for dim in range(2):
        pieces = sorted({ix[dim].indices(shape[dim])[:2] for ix in index_map.values()})
        for (_, stop), (start, _) in zip(pieces, pieces[1:]):
            if stop != start:
                raise ValueError(
                    f"process {jax.process_index()} holds non-adjacent parts {pieces} of "
                    f"dimension {dim} of the batch; order the mesh so each process's "
                    "devices hold one block"
                )
        bounds.append(slice(pieces[0][0], pieces[-1][1]))
    return bounds[0], bounds[1]
