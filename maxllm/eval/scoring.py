"""Scoring text with a model: log-likelihoods of continuations and of whole
documents, batched with padding buckets, for a run directory or an HF folder.

    lm = LanguageModel.load("runs/quickstart")          # or an HF folder
    lm.loglikelihood([(context_ids, continuation_ids), ...])  -> [(logprob, is_greedy), ...]
    lm.loglikelihood_rolling(document_ids)                    -> logprob of every token

Conventions are lm-evaluation-harness's: a continuation is scored given its
context (the context truncated from the left when the pair exceeds the model's
length); `is_greedy` says whether every continuation token is the argmax; a
document is scored in disjoint windows of `max_seq_len` predicted tokens, the
first token predicted from a prefix token (BOS, or EOS for tokenizers without
one), each window conditioned on the token before it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass
class _Row:
    index: int
    inputs: list[int]
    targets: list[int]
    scored: int  # the last `scored` targets count


class LanguageModel:
    """A model held for scoring (no gradients, no cache)."""

    def __init__(self, graphdef: nnx.GraphDef, params: Any, config: Any, tokenizer: Any = None, batch_size: int = 16):
        self.graphdef, self.params, self.config, self.tokenizer = graphdef, params, config, tokenizer
        self.max_len = config.model.max_seq_len
        self.batch_size = batch_size

        def score(params, tokens_BT, targets_BT, segments_BT):
            model = nnx.merge(graphdef, params)
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
            logits_BTV, _, _ = model(tokens_BT, positions_BT, segments_BT)
            logprobs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
            target_BT = jnp.take_along_axis(logprobs_BTV, targets_BT[..., None], axis=-1)[..., 0]
            greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
            return target_BT, greedy_BT

        self._score = jax.jit(score)

    @classmethod
    def load(cls, path: str | Path, *, dtype: str = "float32", batch_size: int = 16,
             overrides: Sequence[str] = ()) -> "LanguageModel":
        """A run directory (newest checkpoint) or a Hugging Face folder."""
        from maxllm.data import open_tokenizer
        from maxllm.hf import load_pretrained
        from maxllm.models import build_model

        loaded = load_pretrained(path, [f"model.dtype={dtype}", "model.remat=none", *overrides])
        cfg = loaded.config
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg.model, 0)))
        tokenizer = open_tokenizer(cfg.data, cfg.model.vocab_size)
        return cls(graphdef, loaded.params, cfg, tokenizer, batch_size)

    # -----------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """log P(continuation | context) and whether greedy decoding gives it."""
        rows = []
        for i, (context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {i}: empty continuation")
            whole = [*context, *continuation][-(self.max_len + 1):]
            rows.append(_Row(i, whole[:-1], whole[1:], len(continuation)))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for row, (logprob_T, greedy_T) in self._run(rows):
            out[row.index] = (float(np.sum(logprob_T[-row.scored:])), bool(np.all(greedy_T[-row.scored:])))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, tokens: Sequence[int]) -> float:
        """log P(document): every token scored, in disjoint windows of max_len."""
        return self.loglikelihood_rolling_many([tokens])[0]

    def loglikelihood_rolling_many(self, documents: Sequence[Sequence[int]]) -> list[float]:
        prefix = self._prefix_token()
        rows, owner = [], []
        for d, tokens in enumerate(documents):
            shifted = [prefix, *tokens]
            for start in range(0, len(tokens), self.max_len):
                end = min(start + self.max_len, len(tokens))
                rows.append(_Row(len(rows), shifted[start:end], list(tokens[start:end]), end - start))
                owner.append(d)
        totals = [0.0] * len(documents)
        for row, (logprob_T, _) in self._run(rows):
            totals[owner[row.index]] += float(np.sum(logprob_T))
        return totals

    def _prefix_token(self) -> int:
        tok = self.tokenizer
        if tok is None:
            raise ValueError("scoring whole documents needs a tokenizer (its BOS or EOS starts each document)")
        return tok.bos_id if tok.bos_id is not None else tok.eos_id

    def _run(self, rows: list[_Row]):
        """Yields (row, (target log-probs (T,), greedy flags (T,))), in batches of
        similar length (longest first), each padded to a power-of-two bucket."""
        order = sorted(rows, key=lambda r: -len(r.inputs))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            T = _bucket(len(batch[0].inputs), self.max_len)
            B = self.batch_size if len(order) > self.batch_size else len(batch)
            tokens = np.zeros((B, T), np.int32)
            targets = np.zeros((B, T), np.int32)
            segments = np.zeros((B, T), np.int32)
            for b, row in enumerate(batch):
                n = len(row.inputs)
                tokens[b, :n], targets[b, :n], segments[b, :n] = row.inputs, row.targets, 1
            logprob, greedy = jax.device_get(self._score(self.params, tokens, targets, segments))
            for b, row in enumerate(batch):
                n = len(row.inputs)
                yield row, (logprob[b, :n], greedy[b, :n])


def _bucket(n: int, max_len: int) -> int:
    """The padded length for n tokens: a power of two (at least 16), at most max_len."""
    size = 16
    while size < n:
        size *= 2
    return min(size, max_len) if n <= max_len else n
