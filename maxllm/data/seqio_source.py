"""seqio Tasks and Mixtures as a document stream for the Grain packing pipeline.

For users who already describe their data as seqio Tasks (T5X, older MaxText):
`data.source: seqio` with `data.seqio.task` reads the registered Task or Mixture
(Mixtures sample their tasks by rate, as seqio does) and feeds its token ids to the
same chunking, packing and batching as every other source. Needs the optional extra
`pip install "maxllm[seqio]"` (seqio pulls TensorFlow).

Each process reads its own shard (`seqio.ShardInfo`), shuffled by seqio with the
run's seed and repeated without end. The iterator's state is the number of
examples this process has consumed; restoring rebuilds the (deterministic) tf.data
pipeline and skips that many, so a resumed run sees the same documents.
"""

from __future__ import annotations

import importlib
from typing import Any

import grain
import numpy as np

from maxllm.config import SeqioConfig
from maxllm.data.sources import DataError


def _seqio():
    try:
        import seqio
    except ImportError:
        raise DataError('data.source=seqio needs seqio: pip install "maxllm[seqio]"') from None
    return seqio


def get_provider(cfg: SeqioConfig):
    seqio = _seqio()
    if cfg.module:
        try:
            importlib.import_module(cfg.module)
        except ImportError as e:
            raise DataError(f"data.seqio.module={cfg.module!r}: cannot import ({e})") from None
    try:
        provider = seqio.get_mixture_or_task(cfg.task)
    except ValueError as e:
        raise DataError(f"data.seqio.task={cfg.task!r}: {e}") from None
    if cfg.feature not in provider.output_features:
        raise DataError(
            f"data.seqio.feature={cfg.feature!r}: task {cfg.task!r} has features {sorted(provider.output_features)}"
        )
    return provider


class SeqioDocuments(grain.IterDataset):
    """Token arrays (int32, EOS last) of one process's shard of a seqio provider."""

    def __init__(self, cfg: SeqioConfig, *, shard_index: int, shard_count: int, seed: int, shuffle: bool, num_epochs: int | None, model_vocab: int):
        super().__init__()
        self.cfg = cfg
        self.shard = (shard_index, shard_count)
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        provider = get_provider(cfg)
        vocabulary = provider.output_features[cfg.feature].vocabulary
        if vocabulary.vocab_size > model_vocab:
            raise DataError(
                f"data.seqio.task={cfg.task!r}: its vocabulary has {vocabulary.vocab_size} tokens "
                f"but model.vocab_size is {model_vocab}"
            )
        self.eos_id = vocabulary.eos_id

    def __iter__(self) -> "_SeqioIterator":
        return _SeqioIterator(self)


class _SeqioIterator(grain.DatasetIterator):
    def __init__(self, parent: SeqioDocuments):
        super().__init__()
        self.parent = parent
        self.consumed = 0
        self._it = None

    def _open(self):
        seqio = _seqio()
        p = self.parent
        dataset = get_provider(p.cfg).get_dataset(
            sequence_length=None, split=p.cfg.split, use_cached=False, shuffle=p.shuffle,
            seed=p.seed, num_epochs=p.num_epochs, shard_info=seqio.ShardInfo(*p.shard),
        )
        return dataset.skip(self.consumed).as_numpy_iterator()

    def __next__(self) -> np.ndarray:
        if self._it is None:
            self._it = self._open()
        example = next(self._it)
        self.consumed += 1
        ids = np.asarray(example[self.parent.cfg.feature], np.int32).reshape(-1)
        if self.parent.cfg.add_eos and (len(ids) == 0 or ids[-1] != self.parent.eos_id):
            ids = np.append(ids, np.int32(self.parent.eos_id))
        return ids

    def get_state(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def set_state(self, state: dict[str, Any]) -> None:
        self.consumed = int(state["consumed"])
        self._it = None


def seqio_documents(cfg: SeqioConfig, **kwargs: Any) -> SeqioDocuments:
    return SeqioDocuments(cfg, **kwargs)
