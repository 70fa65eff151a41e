"""The decode engine: a fixed number of slots over one preallocated cache, with
continuous batching.

- **Prefill** one request: its prompt padded to the next length bucket (so the
  number of compiled shapes stays small), run through the model with a one-row
  cache; the first token is sampled there.
- **Insert** that row into a free slot of the engine's cache, along each entry's
  batch axis (`model.CACHE_BATCH_AXES`: the cache is the family's own decode
  state, KV for attention, so other families plug in unchanged).
- **Generate**: one jitted step decodes one token for every slot at once; a new
  request joins as soon as a slot is free, while the others keep decoding.

A background thread runs the loop; requests arrive on a queue and get their
tokens through callbacks. Per-request options (temperature, top-k, top-p,
repetition penalty, seed) are per-slot arrays, so one compiled step serves all.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxllm.serve.sampling import sample

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    prompt_logprobs: bool = False


@dataclasses.dataclass
class Token:
    id: int
    logprob: float
    text: str  # the text this token adds (may be empty while bytes are incomplete)


@dataclasses.dataclass
class Result:
    tokens: list[Token]
    text: str
    finish_reason: str  # "eos" | "stop" (a stop string) | "length" | "cancelled" | "error"
    prompt_tokens: int
    prompt_logprobs: list[float | None] | None
    time_to_first_token: float
    decode_seconds: float  # from the first token to the last


class Request:
    """One generation: the engine calls `on_token(token)` for each new token and
    `on_done(result)` once, whatever happens to it; `cancel()` (from any thread)
    frees its slot at the next step, or drops it unstarted, with the result
    "cancelled"."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 on_token: Callable[[Token], None] | None = None,
                 on_done: Callable[[Result], None] | None = None):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_token = on_token or (lambda token: None)
        # Text per token is only worked out when someone reads it as it comes (a
        # stream) or stop strings must be matched; otherwise once, at the end.
        self.wants_text = on_token is not None or bool(params.stop)
        self.on_done = on_done or (lambda result: None)
        self.cancelled = False
        self.done = False  # on_done was called
        self.created = time.perf_counter()
        # filled by the engine
        self.ids: list[int] = []
        self.tokens: list[Token] = []
        self.emitted = ""  # text already handed out
        self.text = ""  # decoded so far
        self.prefix_offset = self.read_offset = 0  # incremental detokenization window
        self.first_token_at: float | None = None
        self.prompt_logprobs: list[float | None] | None = None

    def cancel(self) -> None:
        self.cancelled = True


def length_buckets(max_len: int, smallest: int = 16) -> list[int]:
    buckets, n = [], smallest
    while n < max_len:
        buckets.append(n)
        n *= 2
    return [*buckets, max_len]


def unstack_layers(params: dict, num_layers: int) -> dict:
    """The parameter tree with the layer stack held as one tree per layer.

    For a model that runs its layers unrolled: slicing layer i out of a stacked
    weight inside the jitted step is a copy on XLA:CPU (every weight, every
    token), while `restack_layers` on separate arrays followed by that slice
    simplifies to the layer's own array, read in place."""
    stacked = params["layers"]
    layers = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)]
    return {**params, "layers": layers}


def restack_layers(params: dict) -> dict:
    """Inside jit: the stacked tree the model expects, from `unstack_layers`'."""
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"])}


class Engine:
    def __init__(self, graphdef: nnx.GraphDef, params: Any, tokenizer, *, slots: int = 8, max_len: int = 512,
                 seed: int = 0, max_prefill_tokens: int = 4096):
        self.graphdef, self.tokenizer = graphdef, tokenizer
        self.slots, self.max_len = slots, max_len
        self.buckets = length_buckets(max_len)
        self.max_prefill_tokens = max_prefill_tokens
        self.counts = sorted({2**i for i in range(slots.bit_length()) if 2**i < slots} | {slots})
        self._shapes = set(self.prefill_shapes())
        model = nnx.merge(graphdef, params)
        self.unrolled = not model.cfg.scan_layers and isinstance(params.get("layers"), dict)
        # The weights as the jitted parts take them (one tree per layer when unrolled).
        self._weights = unstack_layers(params, model.cfg.num_layers) if self.unrolled else params
        self.vocab = model.cfg.vocab_size
        self.batch_axes = model.CACHE_BATCH_AXES
        self.cache = jax.jit(lambda: model.init_cache(slots, max_len))()
        self.eos_id = tokenizer.eos_id
        S, V = slots, self.vocab
        self.seen = jnp.zeros((S, V), jnp.bool_)
        self.keys = jax.random.split(jax.random.key(seed), S)  # each replaced when a request takes the slot
        self._seeds = np.random.default_rng()  # fresh entropy, for requests that give no seed
        # Per-slot inputs of the step, kept on the device: the last token of each slot
        # (the step's own output feeds the next step) and the sampling options.
        self.last = jnp.zeros(S, jnp.int32)
        self.options = (jnp.zeros(S, jnp.float32), jnp.zeros(S, jnp.int32), jnp.ones(S, jnp.float32),
                        jnp.ones(S, jnp.float32))  # temperature, top_k, top_p, repetition penalty
        self.active: list[Request | None] = [None] * S
        self._launched: tuple | None = None  # a step dispatched but not read yet, and who it was for
        self.pending: queue.Queue[Request] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._compile()

    @property
    def params(self) -> Any:
        """The model's parameter tree (layers stacked; a copy when they run unrolled)."""
        return restack_layers(self._weights) if self.unrolled else self._weights

    # ------------------------------------------------------------------ jitted parts

    def _compile(self) -> None:
        graphdef, max_len, axes = self.graphdef, self.max_len, self.batch_axes
        restack = restack_layers if self.unrolled else (lambda params: params)

        def prefill(params, tokens_nP, lengths_n, seeds_n, options, prompt_logprobs):
            """n prompts at once (right-padded to one length bucket; padding rows
            have length 0): their caches, seen-token sets, first tokens and
            log-probs, the slots' PRNG keys, and the prompt log-probs if asked."""
            temperature, top_k, top_p, penalty = options
            model = nnx.merge(graphdef, restack(params))
            n, P = tokens_nP.shape
            positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (n, P))
            segments = (positions < lengths_n[:, None]).astype(jnp.int32)
            cache = model.init_cache(n, max_len)
            last_n = jnp.maximum(lengths_n - 1, 0)
            logits, cache, _ = model(tokens_nP, positions, segments, cache,
                                     logit_index_B=None if prompt_logprobs else last_n)
            if prompt_logprobs:
                logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
                prompt_lp = jnp.take_along_axis(logprobs, tokens_nP[:, 1:, None], axis=-1)[..., 0]
                logits = jnp.take_along_axis(logits, last_n[:, None, None], axis=1)
            else:
                prompt_lp = jnp.zeros((n, 0), jnp.float32)
            rows = jnp.broadcast_to(jnp.arange(n)[:, None], (n, P))
            seen = jnp.zeros((n, logits.shape[-1]), jnp.bool_).at[rows, tokens_nP].max(segments > 0)
            keys = jax.vmap(lambda seed: jax.random.split(jax.random.key(seed)))(seeds_n)  # (slot key, prefill key)
            token, lp = sample(logits[:, 0], temperature, top_k, top_p, penalty, seen, keys[:, 1])
            seen = seen.at[jnp.arange(n), token].set(True)
            return cache, seen, token, lp, prompt_lp, keys[:, 0]

        def insert(cache, rows, seen_all, seen_rows, keys, new_keys, last, tokens, options, values, slots_n):
            """Puts n prefilled rows into slots `slots_n`; an index past the last
            slot (a padding row) is dropped."""
            def put(entry, row, axis):
                index = (slice(None),) * axis + (slots_n,)
                return entry.at[index].set(row.astype(entry.dtype), mode="drop")

            cache = {k: jax.tree.map(lambda v, r, a=axes[k]: put(v, r, a), entry, rows[k]) for k, entry in cache.items()}
            options = tuple(put(o, v, 0) for o, v in zip(options, values))
            return (cache, put(seen_all, seen_rows, 0), put(keys, new_keys, 0), put(last, tokens, 0), options)

        def step(params, cache, last_S, seen_SV, keys_S, options):
            temperature, top_k, top_p, penalty = options
            model = nnx.merge(graphdef, restack(params))
            positions = cache["index"][:, None]
            logits_S1V, cache, _ = model(last_S[:, None], positions, jnp.ones_like(positions), cache)
            token_S, lp_S = sample(logits_S1V[:, 0], temperature, top_k, top_p, penalty, seen_SV, keys_S,
                                   counter_S=positions[:, 0])
            seen_SV = seen_SV.at[jnp.arange(seen_SV.shape[0]), token_S].set(True)
            return cache, token_S, lp_S, seen_SV

        self._prefill = jax.jit(prefill, static_argnums=(5,))
        self._insert = jax.jit(insert, donate_argnums=(0, 2, 4, 8))  # not `last`: a pending step's output
        self._step = jax.jit(step, donate_argnums=(1, 3))

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """(prompts, length bucket) pairs a prefill may run with: prompt counts are
        powers of two below the slots and the slots, within `max_prefill_tokens`."""
        return [(c, b) for b in self.buckets for c in self.counts if c == 1 or c * b <= self.max_prefill_tokens]

    def _shape(self, prompts: list[list[int]]) -> tuple[int, int] | None:
        """The prefill shape for these prompts, or None if there is none."""
        count = next(c for c in self.counts if c >= len(prompts))
        bucket = next(b for b in self.buckets if b >= max(map(len, prompts)))
        return (count, bucket) if (count, bucket) in self._shapes else None

    def warmup(self) -> None:
        """Compiles the step and every prefill shape (with its insert) before
        serving; a prefill with prompt log-probs compiles on first use."""
        for count, bucket in self.prefill_shapes():
            prompts = [[1] * min(bucket, self.max_len - 1)] * count
            self._insert_rows([], *self._run_prefill(prompts, [SamplingParams(max_new_tokens=1)] * count, [0] * count))
        jax.block_until_ready(self._launch())

    # ------------------------------------------------------------------ loop

    def submit(self, request: Request) -> None:
        total = len(request.prompt_ids) + request.params.max_new_tokens
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        if total > self.max_len:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                             f"({request.params.max_new_tokens}) exceeds {self.max_len}")
        self.pending.put(request)
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="maxllm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def queue_depth(self) -> int:
        return self.pending.qsize()

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self.active)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if self.busy_slots == 0:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._generate()
            except Exception:  # never let one bad request stop the engine
                log.exception("engine step failed; failing the requests in flight")
                self._launched = None
                for i, r in enumerate(self.active):
                    if r is not None:
                        self._finish(i, "error")

    def _admit(self) -> None:
        """Prefills waiting requests into free slots, as many at once as fit one
        prefill shape."""
        free = [i for i, r in enumerate(self.active) if r is None]
        batch: list[Request] = []
        while free:
            try:
                request = self.pending.get_nowait()
            except queue.Empty:
                break
            if request.cancelled:  # its client went away while it waited
                self._abandon(request, "cancelled")
                continue
            if batch and self._shape([r.prompt_ids for r in (*batch, request)]) is None:
                self._start_or_fail(free[: len(batch)], batch)
                free, batch = free[len(batch):], []
            batch.append(request)
            if len(batch) == len(free):
                self._start_or_fail(free, batch)
                free, batch = [], []
        if batch:
            self._start_or_fail(free[: len(batch)], batch)

    def _start_or_fail(self, slots: list[int], requests: list[Request]) -> None:
        """Starts these requests; if that fails, each gets an "error" result
        (none is left waiting) and the engine goes on."""
        try:
            self._start(slots, requests)
        except Exception:
            log.exception("prefill failed; failing its %d requests", len(requests))
            for slot, request in zip(slots, requests):
                if self.active[slot] is request:
                    self.active[slot] = None
                self._abandon(request, "error")

    @staticmethod
    def _abandon(request: Request, reason: str) -> None:
        """Ends a request that holds no slot (every request hears back once)."""
        if not request.done:
            request.done = True
            request.on_done(Result(request.tokens, "", reason, len(request.prompt_ids), None, 0.0, 0.0))

    def _run_prefill(self, prompts: list[list[int]], params: list[SamplingParams], seeds: list[int]):
        """Dispatches one prefill for these prompts, padded to the next prompt count
        and length bucket (padding rows have length 0)."""
        count, bucket = self._shape(prompts)
        tokens = np.zeros((count, bucket), np.int32)
        lengths, seed_arr = np.zeros(count, np.int32), np.zeros(count, np.uint32)
        options = [np.zeros(count, np.float32), np.zeros(count, np.int32), np.ones(count, np.float32),
                   np.ones(count, np.float32)]
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            tokens[i, : len(prompt)] = prompt
            lengths[i], seed_arr[i] = len(prompt), seeds[i]
            for o, v in zip(options, (p.temperature, p.top_k, p.top_p, p.repetition_penalty)):
                o[i] = v
        want_lp = any(p.prompt_logprobs for p in params)
        out = self._prefill(self._weights, tokens, lengths, seed_arr, tuple(options), want_lp)
        return count, options, out

    def _insert_rows(self, slots: list[int], count: int, options, prefilled):
        """Inserts a prefill's first len(slots) rows into `slots` (the rest are
        padding, dropped); returns its tokens, log-probs and prompt log-probs."""
        rows, seen, token, lp, prompt_lp, keys = prefilled
        slot_index = np.full(count, self.slots, np.int32)
        slot_index[: len(slots)] = slots
        self.cache, self.seen, self.keys, self.last, self.options = self._insert(
            self.cache, rows, self.seen, seen, self.keys, keys, self.last, token, self.options, tuple(options),
            slot_index)
        return token, lp, prompt_lp

    def _start(self, slots: list[int], requests: list[Request]) -> None:
        seeds = [r.params.seed if r.params.seed is not None else int(self._seeds.integers(2**32)) for r in requests]
        seeds = [(seed ^ (seed >> 32)) & 0xFFFFFFFF for seed in seeds]  # any int (TGI's are u64) to 32 bits
        count, options, out = self._run_prefill([r.prompt_ids for r in requests], [r.params for r in requests], seeds)
        token, lp, prompt_lp = self._insert_rows(slots, count, options, out)
        tokens, lps, prompt_lps = jax.device_get((token, lp, prompt_lp))  # waits for the prefill
        now = time.perf_counter()
        for i, (slot, request) in enumerate(zip(slots, requests)):
            self.active[slot] = request
            if request.params.prompt_logprobs:
                n = len(request.prompt_ids)
                request.prompt_logprobs = [None, *prompt_lps[i, : n - 1].tolist()]
            request.first_token_at = now
            self._accept(slot, int(tokens[i]), float(lps[i]))

    def _launch(self):
        """Dispatches one step for every slot (asynchronously); returns its outputs."""
        self.cache, token_S, lp_S, self.seen = self._step(
            self._weights, self.cache, self.last, self.seen, self.keys, self.options)
        self.last = token_S
        return token_S, lp_S

    def _generate(self) -> None:
        """Reads the step dispatched last time and dispatches the next one first, so
        the device computes step n+1 while the host hands out step n's tokens. A
        slot whose request changed since a step was dispatched ignores its output."""
        if self._launched is None:
            self._launched = (self._launch(), list(self.active))
        (tokens, logprobs), owners = self._launched
        self._launched = (self._launch(), list(self.active))
        tokens, logprobs = jax.device_get((tokens, logprobs))  # one host sync per step
        for slot, request in enumerate(self.active):
            if request is not None and owners[slot] is request:
                self._accept(slot, int(tokens[slot]), float(logprobs[slot]))
        if self.busy_slots == 0:
            self._launched = None

    def _accept(self, slot: int, token: int, logprob: float) -> None:
        """Takes the slot's new token; hands out text; finishes the request when done."""
        request = self.active[slot]
        if request.cancelled:
            return self._finish(slot, "cancelled")
        p = request.params
        if token == self.eos_id and not p.ignore_eos:
            return self._finish(slot, "eos")
        request.ids.append(token)
        if not request.wants_text:
            request.tokens.append(Token(token, logprob, ""))
            if len(request.ids) >= p.max_new_tokens:
                return self._finish(slot, "length")
            return None
        request.text += self._detokenize(request)
        text = request.text
        stop_at = -1
        if p.stop:  # a stop string can only end in the newest part of the text
            window = len(text) - max(len(s) for s in p.stop) - 8
            found = [i for i in (text.find(s, max(0, window)) for s in p.stop) if i >= 0]
            stop_at = min(found, default=-1)
        if stop_at >= 0:
            text = text[:stop_at]
        # Hold back what may still become a stop string.
        hold = max((len(s) - 1 for s in p.stop), default=0) if stop_at < 0 else 0
        safe = text[: len(text) - hold] if hold else text
        delta = safe[len(request.emitted):] if len(safe) > len(request.emitted) else ""
        request.emitted += delta
        tok = Token(token, logprob, delta)
        request.tokens.append(tok)
        request.on_token(tok)
        if stop_at >= 0:
            return self._finish(slot, "stop", text)
        if len(request.ids) >= p.max_new_tokens:
            return self._finish(slot, "length", text)
        return None

    def _detokenize(self, request: Request) -> str:
        """The text the newest token adds, decoding only a short window of ids (as
        TGI does): the text of ids[prefix:] minus that of ids[prefix:read]. Held
        while the window ends in an incomplete UTF-8 sequence."""
        ids = request.ids
        before = self.tokenizer.decode(ids[request.prefix_offset:request.read_offset])
        after = self.tokenizer.decode(ids[request.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            request.prefix_offset, request.read_offset = request.read_offset, len(ids)
            return after[len(before):]
        return ""

    def _finish(self, slot: int, reason: str, text: str | None = None) -> None:
        request = self.active[slot]
        self.active[slot] = None
        request.done = True
        if text is None:
            text = self.tokenizer.decode(request.ids) if request.ids else ""
        elif text == request.text and request.ids:
            text = self.tokenizer.decode(request.ids)  # the whole, in case a window held bytes back
        if len(text) > len(request.emitted) and text.startswith(request.emitted):
            rest = text[len(request.emitted):]  # text held back for stop strings, now final
            request.emitted = text
            request.on_token(Token(-1, 0.0, rest))  # id -1: text only, no new token
        now = time.perf_counter()
        first = request.first_token_at or now
        request.on_done(Result(request.tokens, text, reason, len(request.prompt_ids), request.prompt_logprobs,
                               first - request.created, now - first))

    # ------------------------------------------------------------------ blocking helper

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float = 600) -> Result:
        """Submits one request and waits for its result (the engine must be started)."""
        done = threading.Event()
        box: list[Result] = []
        self.submit(Request(prompt_ids, params, on_done=lambda r: (box.append(r), done.set())))
        if not done.wait(timeout):
            raise TimeoutError("generation did not finish")
        return box[0]
