"""Synthetic rows: packed random documents, each a short random phrase repeated, so
a model can learn them (induction) and the loss falls.

Every row is a pure function of (seed, step, row), whatever the process layout:
sharding and multi-host parity tests compare runs on exactly the same data, and a
resumed run continues from the restored step with no iterator state.
"""

from __future__ import annotations

import numpy as np

Batch = dict[str, np.ndarray]


def pack_window(window: np.ndarray, doc_ids: np.ndarray) -> Batch:
    """One row from T+1 consecutive tokens and the document id of each."""
    inputs, targets = window[:-1], window[1:]
    docs = doc_ids[:-1]
    starts = np.concatenate([[True], docs[1:] != docs[:-1]])
    first = np.maximum.accumulate(np.where(starts, np.arange(len(docs)), 0))
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "positions": (np.arange(len(docs)) - first).astype(np.int32),
        "segment_ids": np.cumsum(starts).astype(np.int32),
        "loss_mask": (doc_ids[1:] == docs).astype(np.float32),
    }


class SyntheticRows:
    def __init__(self, seq_len: int, vocab_size: int, seed: int):
        self.seq_len, self.vocab, self.seed = seq_len, vocab_size, seed

    def _row(self, step: int, row: int) -> Batch:
        rng = np.random.default_rng([self.seed, step, row])
        T = self.seq_len
        tokens: list[int] = []
        docs: list[int] = []
        doc = 0
        while len(tokens) < T + 1:
            length = int(rng.integers(T // 4 + 2, T + 2))
            phrase = rng.integers(1, self.vocab, size=int(rng.integers(2, 9)))
            tokens.extend(np.resize(phrase, length))
            docs.extend([doc] * length)
            doc += 1
        return pack_window(np.asarray(tokens[: T + 1]), np.asarray(docs[: T + 1]))

    def rows(self, step: int, start: int, stop: int) -> Batch:
        """Rows [start, stop) of the global batch of `step`."""
        rows = [self._row(step, r) for r in range(start, stop)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
