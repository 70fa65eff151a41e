"""Scoring text with a model: log-likelihoods of continuations and of whole
documents, batched with padding buckets, for a run directory or an HF folder.

    lm = LanguageModel.load("runs/quickstart")          # or an HF folder
    lm.loglikelihood([(context_ids, continuation_ids), ...])  -> [(logprob, is_greedy), ...]
    lm.loglikelihood_rolling(document_ids)                    -> logprob of every token
    lm.generate_until([(context, stop_strings, max_new_tokens), ...]) -> [text, ...]

Conventions are lm-evaluation-harness's: a continuation is scored given its
context (the context truncated from the left when the pair exceeds the model's
length); `is_greedy` says whether every continuation token is the argmax; a
document is scored in disjoint windows of `max_seq_len` predicted tokens, the
first token predicted from a prefix token (BOS, or EOS for tokenizers without
one), each window conditioned on the token before it, and a short last window
on as many earlier tokens as fill the model's length; generation is greedy,
from the context cut from the left to leave room for the new tokens, and ends at
EOS, at `max_new_tokens`, or before the first stop string.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from flax import nnx

from maxllm.models import FAMILIES, build_model


@dataclasses.dataclass
class _Row:
    index: int
    inputs: list[int]
    targets: list[int]
    scored: int  # the last `scored` targets count


class LanguageModel:
    """A model held for scoring and greedy generation (no gradients)."""

    def __init__(self, graphdef: nnx.GraphDef, params: Any, config: Any, tokenizer: Any = None, batch_size: int = 16,
                 batch_multiple: int = 1):
        """`batch_multiple`: every batch has a multiple of this many rows (the
        data-parallel devices of a training mesh, so the batch splits over them)."""
        self.graphdef, self.params, self.config, self.tokenizer = graphdef, params, config, tokenizer
        self.max_len = config.model.max_seq_len
        self.batch_multiple = batch_multiple
        self.batch_size = _round_up(batch_size, batch_multiple)

        def targets(logits_BTV, targets_BT):
            """Log-probs of the targets, and whether each is the argmax."""
            logprobs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
            target_BT = jnp.take_along_axis(logprobs_BTV, targets_BT[..., None], axis=-1)[..., 0]
            return target_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT

        def score(params, tokens_BT, targets_BT, segments_BT):
            model = nnx.merge(graphdef, params)
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
            logits_BTV, _, _ = model(tokens_BT, positions_BT, segments_BT)
            return targets(logits_BTV, targets_BT)

        def prefill(params, tokens_BP, lengths_B, cache_len):
            """Right-padded prompts into a new cache; the log-probs of the token
            after each prompt (B, V)."""
            model = nnx.merge(graphdef, params)
            B, P = tokens_BP.shape
            positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
            segments_BP = (positions_BP < lengths_B[:, None]).astype(jnp.int32)
            cache = model.init_cache(B, cache_len)
            logits_B1V, cache, _ = model(tokens_BP, positions_BP, segments_BP, cache,
                                         logit_index_B=jnp.maximum(lengths_B - 1, 0))
            return jax.nn.log_softmax(logits_B1V[:, 0].astype(jnp.float32), axis=-1), cache

        def decode(params, token_B, cache):
            model = nnx.merge(graphdef, params)
            position_B1 = cache["index"][:, None]
            logits_B1V, cache, _ = model(token_B[:, None], position_B1, jnp.ones_like(position_B1), cache)
            return jnp.argmax(logits_B1V[:, 0], -1).astype(jnp.int32), cache

        def continuations(params, cache, owner_R, tokens_RT, targets_RT, lengths_R):
            """Each row continues its context's cached row (`owner_R`)."""
            model = nnx.merge(graphdef, params)
            axes = model.CACHE_BATCH_AXES
            cache = {k: jax.tree.map(lambda x, a=axes[k]: jnp.take(x, owner_R, axis=a), v) for k, v in cache.items()}
            R, T = tokens_RT.shape
            steps_RT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (R, T))
            positions_RT = cache["index"][:, None] + steps_RT
            segments_RT = (steps_RT < lengths_R[:, None]).astype(jnp.int32)
            logits_RTV, _, _ = model(tokens_RT, positions_RT, segments_RT, cache)
            return targets(logits_RTV, targets_RT)

        self._score = jax.jit(score)
        self._prefill = jax.jit(prefill, static_argnums=3)
        self._continuations = jax.jit(continuations)
        self._decode = jax.jit(decode, donate_argnums=2)
        # A context shared by several continuations (the choices of a question) is
        # run once and its cache reused, for families whose cache can be continued.
        self.share_contexts = "k" in FAMILIES[config.model.family].CACHE_BATCH_AXES

    @classmethod
    def load(cls, path: str | Path, *, dtype: str = "float32", batch_size: int = 16,
             overrides: Sequence[str] = ()) -> "LanguageModel":
        """A run directory (newest checkpoint) or a Hugging Face folder."""
        from maxllm.data import open_tokenizer
        from maxllm.hf import load_pretrained

        loaded = load_pretrained(path, [f"model.dtype={dtype}", "model.remat=none", *overrides])
        cfg = loaded.config
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg.model, 0)))
        tokenizer = open_tokenizer(cfg.data, cfg.model.vocab_size)
        return cls(graphdef, loaded.params, cfg, tokenizer, batch_size)

    # -----------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a (context, continuation) text pair, as the harness makes
        them: whitespace ending the context moves to the continuation; the
        continuation is what encoding the whole adds past the context's tokens;
        an empty context is the prefix token (BOS, else EOS), unless the
        continuation starts with that token."""
        tok = self.require_tokenizer()
        stripped = context.rstrip()
        if not stripped:
            ids = tok.encode(context + continuation)
            prefix = self._prefix_token()
            return ([prefix], ids) if not ids or ids[0] != prefix else (ids[:1], ids[1:])
        continuation = context[len(stripped):] + continuation
        context_ids = tok.encode(stripped)
        return context_ids, tok.encode(stripped + continuation)[len(context_ids):]

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """log P(continuation | context) and whether greedy decoding gives it."""
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        rows, groups = [], {}
        for i, (context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {i}: empty continuation")
            if self.share_contexts and context and len(context) + len(continuation) <= self.max_len + 1:
                groups.setdefault(tuple(context), []).append((i, list(continuation)))
                continue
            whole = [*context, *continuation][-(self.max_len + 1):]
            rows.append(_Row(i, whole[:-1], whole[1:], len(continuation)))
        for row, (logprob_T, greedy_T) in self._run(rows):
            out[row.index] = (float(np.sum(logprob_T[-row.scored:])), bool(np.all(greedy_T[-row.scored:])))
        self._run_shared(groups, out)
        return out  # type: ignore[return-value]

    def _run_shared(self, groups: dict[tuple[int, ...], list[tuple[int, list[int]]]], out: list) -> None:
        """Scores continuations sharing a context: the contexts in batches of
        similar length (one forward each, into a cache), then every continuation
        of the batch at once from its context's cached row."""
        contexts = sorted(groups, key=len, reverse=True)
        for start in range(0, len(contexts), self.batch_size):
            batch = contexts[start : start + self.batch_size]
            P = _bucket(len(batch[0]), self.max_len)
            members = [(c, i, cont) for c, ctx in enumerate(batch) for i, cont in groups[ctx]]
            T = _bucket(max(len(cont) - 1 for _, _, cont in members), self.max_len)
            B = self.batch_size if len(contexts) > self.batch_size else self._rows(len(batch))
            tokens, lengths = np.zeros((B, P), np.int32), np.zeros(B, np.int32)
            for b, ctx in enumerate(batch):
                tokens[b, : len(ctx)], lengths[b] = ctx, len(ctx)
            first_BV, cache = self._prefill(self.params, tokens, lengths, P + T)
            # The continuations in chunks of similar length, each padded to its own bucket.
            members.sort(key=lambda m: len(m[2]))
            chunks = []
            for lo in range(0, len(members), self.batch_size):
                chunk = members[lo : lo + self.batch_size]
                Tc = _bucket(max(len(cont) - 1 for _, _, cont in chunk), self.max_len)
                R = _round_up(len(chunk), self.batch_multiple)
                owner, lens = np.zeros(R, np.int32), np.zeros(R, np.int32)
                inputs, targets = np.zeros((R, Tc), np.int32), np.zeros((R, Tc), np.int32)
                for r, (c, _, cont) in enumerate(chunk):
                    n = len(cont) - 1
                    owner[r], lens[r] = c, n
                    inputs[r, :n], targets[r, :n] = cont[:-1], cont[1:]
                chunks.append((chunk, self._continuations(self.params, cache, owner, inputs, targets, lens)))
            first_BV = _fetch(first_BV)
            for chunk, scored in chunks:
                rest_RT, greedy_RT = _fetch(scored)
                for r, (c, i, cont) in enumerate(chunk):
                    n = len(cont) - 1
                    logprob = float(first_BV[c, cont[0]]) + float(np.sum(rest_RT[r, :n]))
                    greedy = bool(np.argmax(first_BV[c]) == cont[0]) and bool(np.all(greedy_RT[r, :n]))
                    out[i] = (logprob, greedy)

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
                first = max(0, end - self.max_len)  # a short last window reaches back for context
                rows.append(_Row(len(rows), shifted[first:end], list(tokens[first:end]), end - start))
                owner.append(d)
        totals = [0.0] * len(documents)
        for row, (logprob_T, _) in self._run(rows):
            totals[owner[row.index]] += float(np.sum(logprob_T[-row.scored:]))
        return totals

    def generate_until(self, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]:
        """Greedy continuations of text contexts: each ends at EOS, after
        `max_new_tokens`, or just before the first of its stop strings (cut there)."""
        tok = self.require_tokenizer()
        prompts = []
        for i, (context, stop, max_new) in enumerate(requests):
            if not 0 < max_new < self.max_len:
                raise ValueError(f"request {i}: max_new_tokens={max_new} must be in [1, {self.max_len})")
            ids = tok.encode(context) if context else [self._prefix_token()]
            prompts.append((i, ids[-(self.max_len - max_new):], tuple(stop), max_new))
        out: list[str] = [""] * len(prompts)
        order = sorted(prompts, key=lambda p: -len(p[1]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for (i, _, stop, _), text in zip(batch, self._generate_batch(batch)):
                out[i] = _cut(text, stop)
        return out

    def _generate_batch(self, batch, check_every: int = 8) -> list[str]:
        """Decodes one batch until every row is done; rows are checked for EOS and
        stop strings every `check_every` tokens (one host sync per check)."""
        tok = self.tokenizer
        P = _bucket(max(len(p[1]) for p in batch), self.max_len)
        N = max(p[3] for p in batch)
        B = self._rows(len(batch))
        tokens = np.zeros((B, P), np.int32)
        lengths = np.zeros(B, np.int32)
        for b, (_, ids, _, _) in enumerate(batch):
            tokens[b, : len(ids)], lengths[b] = ids, len(ids)
        logprobs_BV, cache = self._prefill(self.params, tokens, lengths, _round_up(P + N, 16))
        token_B = jnp.argmax(logprobs_BV, axis=-1).astype(jnp.int32)
        steps, new = [token_B], np.zeros((B, 0), np.int32)
        done = np.zeros(len(batch), bool)
        while True:
            if len(steps) == check_every or new.shape[1] + len(steps) >= N:
                new = np.concatenate([new, np.stack(_fetch(steps), axis=1)], axis=1)
                steps = []
                for b, (_, _, stop, max_new) in enumerate(batch):
                    row = new[b]
                    done[b] = done[b] or len(row) >= max_new or tok.eos_id in row or (
                        bool(stop) and any(s in tok.decode(row.tolist()) for s in stop))
                if done.all():
                    break
            token_B, cache = self._decode(self.params, token_B, cache)
            steps.append(token_B)
        texts = []
        for b, (_, _, _, max_new) in enumerate(batch):
            row = new[b, :max_new].tolist()
            texts.append(tok.decode(row[: row.index(tok.eos_id)] if tok.eos_id in row else row))
        return texts

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("text requests need the model's tokenizer (data.tokenizer, a tokens/ manifest, "
                             "or tokenizer.json in the folder)")
        return self.tokenizer

    def _prefix_token(self) -> int:
        tok = self.require_tokenizer()
        return tok.bos_id if tok.bos_id is not None else tok.eos_id

    def _rows(self, n: int) -> int:
        """Rows of a batch holding n requests: the batch size when requests fill
        several batches (one shape for all), else n rounded up to the multiple."""
        return self.batch_size if n == self.batch_size else _round_up(n, self.batch_multiple)

    def _run(self, rows: list[_Row]):
        """Yields (row, (target log-probs (T,), greedy flags (T,))), in batches of
        similar length (longest first), each padded to its length bucket."""
        order = sorted(rows, key=lambda r: -len(r.inputs))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            T = _bucket(len(batch[0].inputs), self.max_len)
            B = self.batch_size if len(order) > self.batch_size else self._rows(len(batch))
            tokens = np.zeros((B, T), np.int32)
            targets = np.zeros((B, T), np.int32)
            segments = np.zeros((B, T), np.int32)
            for b, row in enumerate(batch):
                n = len(row.inputs)
                tokens[b, :n], targets[b, :n], segments[b, :n] = row.inputs, row.targets, 1
            logprob, greedy = _fetch(self._score(self.params, tokens, targets, segments))
            for b, row in enumerate(batch):
                n = len(row.inputs)
                yield row, (logprob[b, :n], greedy[b, :n])


def _cut(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest of the stop strings."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket(n: int, max_len: int) -> int:
    """The padded length for n tokens: a multiple of 16 up to 256, then of 128,
    at most max_len (n past max_len stays n). Few shapes to compile, little padding."""
    if n > max_len:
        return n
    size = _round_up(max(n, 1), 16 if n <= 256 else 128)
    return min(size, max_len)


def _fetch(tree: Any) -> Any:
    """Host copies of the arrays in `tree`. With several processes the batch is
    sharded across them, so each gathers the whole array (every process scores the
    same examples and needs every row)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(one, tree)
