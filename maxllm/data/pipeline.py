"""Grain pipeline: documents -> seeded global shuffle (new order every epoch) ->
repeat -> shard by process -> (input, target) chunks of at most seq_len -> packing ->
batches -> prefetch -> one global `jax.Array` per feature.

Each document (token ids, EOS last) becomes `inputs = t[:-1]`, `targets = t[1:]`,
cut into pieces of `seq_len`; pieces are packed into rows either first-fit (a
piece never straddles two rows; unused space is padding) or concatenate-then-split
(rows are full; a piece may continue in the next row, where its positions start
again at 0: RoPE sees only relative positions, so attention within the row is the
same). Packing yields segment ids (1, 2, ... per piece in a row, 0 for padding) and
positions restarting at 0 per piece; the loss mask is 1 exactly where the target is
a real token. One-token documents have no (input, target) pair and add nothing.

The iterator's state (Grain's, per process) is saved in the model's Orbax
checkpoint, so a resumed run reads exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import grain.experimental as gx
import numpy as np

FEATURES = ("inputs", "targets")
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")  # the train step's batch: (B, T) each


class ChunkDocument(gx.FlatMapTransform):
    """A document's (input, target) pairs in pieces of at most `length` tokens."""

    max_fan_out = 1 << 30  # unused by the iterator flat-map; documents may be long

    def __init__(self, length: int):
        self.length = length

    def flat_map(self, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
        n = len(tokens) - 1  # the last token is only a target
        return [
            {"inputs": tokens[i : min(i + self.length, n)], "targets": tokens[i + 1 : min(i + self.length, n) + 1]}
            for i in range(0, n, self.length)
        ]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which share of each global batch this process builds."""

    rows: int  # rows per batch from this process
    shard_index: int  # which disjoint part of the data this process reads
    shard_count: int

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def document_stream(
    documents: list[grain.MapDataset],
    weights: list[float] | None,
    *,
    layout: Layout,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
) -> grain.IterDataset:
    """Documents in this process's order: each source shuffled with a seed that
    changes per epoch (Grain's `shuffle` then `repeat` draws a new permutation for
    every epoch), mixed by weight, then every `shard_count`-th element from
    `shard_index` (the processes' parts are disjoint and cover the stream)."""
    per_source = []
    for i, docs in enumerate(documents):
        if shuffle:
            docs = docs.shuffle(seed=seed + i)
        per_source.append(docs.repeat(num_epochs) if num_epochs != 1 else docs)
    mixed = grain.MapDataset.mix(per_source, weights) if len(per_source) > 1 else per_source[0]
    return mixed[layout.shard_index :: layout.shard_count].to_iter_dataset()


def packed_batches(
    documents: grain.IterDataset,
    *,
    seq_len: int,
    rows: int,
    seed: int,
    packing: str,
    packing_bins: int | None,
    shuffle: bool,
    drop_remainder: bool,
    num_workers: int,
    shuffle_window: int = 0,
) -> grain.IterDataset:
    """Batches of `rows` packed rows (numpy dicts with Grain's packing features).

    With `shuffle` and a `shuffle_window`, pieces are shuffled in windows of that
    many before packing: a document longer than a row otherwise fills consecutive
    rows of one batch, and the batch holds only a few documents."""
    pieces = gx.FlatMapIterDataset(documents, ChunkDocument(seq_len))
    if shuffle and shuffle_window > 1:
        pieces = gx.WindowShuffleIterDataset(pieces, window_size=shuffle_window, seed=seed)
    lengths = {f: seq_len for f in FEATURES}
    if packing == "first_fit":
        packed = gx.FirstFitPackIterDataset(
            pieces, length_struct=lengths, num_packing_bins=packing_bins or 4 * rows,
            seed=seed, shuffle_bins=shuffle,
        )
    else:
        packed = gx.ConcatThenSplitIterDataset(pieces, length_struct=lengths)
    batches = packed.batch(rows, drop_remainder=drop_remainder, batch_fn=_StackAndPad(rows))
    if num_workers > 0:
        return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return gx.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=2)


class _StackAndPad:
    """Stacks rows into a batch; a short last batch (finite epochs) is padded with
    empty rows (segment id 0 everywhere, so fully masked)."""

    def __init__(self, rows: int):
        self.rows = rows

    def __call__(self, elements: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        out = {k: np.stack([e[k] for e in elements]) for k in elements[0]}
        missing = self.rows - len(elements)
        if missing:
            out = {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in out.items()}
        return out


def to_model_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Grain's packing features -> the train step's batch. The loss mask is the
    packed `loss_mask` feature when there is one (fine-tuning: learned tokens
    only), else every real target."""
    mask = packed["loss_mask"] if "loss_mask" in packed else packed["targets_segment_ids"] != 0
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "positions": packed["inputs_positions"].astype(np.int32),
        "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
        "loss_mask": mask.astype(np.float32),
    }


class StateSnapshot:
    """An iterator state captured now, for Grain's checkpoint handler (which would
    otherwise read the live iterator later, from a background save)."""

    def __init__(self, state: dict[str, Any]):
        import json

        self._state = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._state
