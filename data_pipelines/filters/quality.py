"""datatrove's Gopher quality, Gopher repetition, C4 quality and FineWeb quality
filters, with the same parameters, defaults, rule names and decisions (datatrove
0.10.1, English), but faster:

- words come from `data_pipelines.text` (spaCy's English tokenization without spaCy,
  cached per chunk, and per text across consecutive filters);
- duplicate lines and paragraphs are counted with sets instead of a Python loop;
- the repetition filter hashes the characters of every word n-gram with a
  polynomial rolling hash in numpy (so "".join and " ".join n-grams are compared as
  strings, as datatrove does) instead of building and counting n-gram strings: one
  sort of all n at once gives bounds (top count, top count × length, repeated
  length) that settle most rules, and only the others are computed exactly (the
  greedy walk of `find_all_duplicate` then visits only n-grams that occur twice);
- C4 counts sentences only until the document has enough.

A 64-bit hash collision between two different n-grams of one document could change
a repetition decision; for natural text the odds are about n_words² / 2⁶⁴.

The rules follow datatrove's source (Apache-2.0): pipeline/filters/
gopher_quality_filter.py, gopher_repetition_filter.py, c4_filters.py and
fineweb_quality_filter.py.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar, Literal

import numpy as np

from data_pipelines import text as _text
from data_pipelines.document import Document, StepConfig
from data_pipelines.text import (
    PUNCTUATION_SET,
    TERMINAL_PUNCTUATION,
    count_sentences,
    count_words,
    split_sentences,
    split_words_cached,
)

# Only English word splitting (spaCy's "en" rules) is implemented.
Language = Literal["en"]

# --------------------------------------------------------------------------- Gopher quality

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


class GopherQualityConfig(StepConfig):
    """Gopher's quality rules (Rae et al. 2021, https://arxiv.org/abs/2112.11446); a
    None threshold turns its rule off."""

    type: Literal["gopher_quality"]
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8  # (datatrove's name: a minimum ratio of words with a letter)
    min_stop_words: int | None = 2
    stop_words: tuple[str, ...] | None = None  # None: STOP_WORDS
    language: Language = "en"


class _WordFacts(dict):
    """word -> (1 if it has a non-punctuation character else 0, its length if so else 0,
    1 if it has a letter else 0), computed once per distinct word."""

    def __missing__(self, word: str) -> tuple[int, int, int]:
        non_symbol = any(ch not in PUNCTUATION_SET for ch in word)
        facts = (int(non_symbol), len(word) if non_symbol else 0, int(any(c.isalpha() for c in word)))
        if len(self) >= 1 << 20:
            self.clear()
        self[word] = facts
        return facts


_WORD_FACTS = _WordFacts()


def clear_caches() -> None:
    """Forget cached words and tokenized chunks (for cold-start benchmarks and tests)."""
    _WORD_FACTS.clear()
    _text.clear_caches()


class GopherQuality:
    """datatrove's GopherQualityFilter."""

    type: ClassVar[str] = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig):
        self.cfg = cfg
        self.stop_words = frozenset(STOP_WORDS if cfg.stop_words is None else cfg.stop_words)

    def __call__(self, doc: Document) -> str | None:
        c = self.cfg
        text = doc.text
        words = split_words_cached(text)
        n_words = len(words)
        if n_words:
            n_non_symbol, non_symbol_chars, n_alpha = map(sum, zip(*map(_WORD_FACTS.__getitem__, words)))
        else:
            n_non_symbol = non_symbol_chars = n_alpha = 0

        if c.min_doc_words and n_non_symbol < c.min_doc_words:
            return "gopher_short_doc"
        if c.max_doc_words and n_non_symbol > c.max_doc_words:
            return "gopher_long_doc"
        if not n_words:  # datatrove divides by zero here (only reachable with min_doc_words off)
            return "gopher_short_doc"

        avg_word_length = non_symbol_chars / n_non_symbol if n_non_symbol else float("nan")
        if c.min_avg_word_length and avg_word_length < c.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if c.max_avg_word_length and avg_word_length > c.max_avg_word_length:
            return "gopher_above_avg_threshold"

        if c.max_symbol_word_ratio and text.count("#") / n_words > c.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if c.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > c.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"

        lines = text.splitlines()
        if c.max_bullet_lines_ratio and (
            sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > c.max_bullet_lines_ratio
        ):
            return "gopher_too_many_bullets"
        if c.max_ellipsis_lines_ratio and (
            sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > c.max_ellipsis_lines_ratio
        ):
            return "gopher_too_many_end_ellipsis"

        if c.max_non_alpha_words_ratio and n_alpha / n_words < c.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"

        if c.min_stop_words and len(self.stop_words.intersection(words)) < c.min_stop_words:
            return "gopher_enough_stop_words"
        return None


# --------------------------------------------------------------------------- Gopher repetition


class GopherRepetitionConfig(StepConfig):
    """Gopher's repetition rules (Table A1 of https://arxiv.org/abs/2112.11446)."""

    type: Literal["gopher_repetition"]
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    language: Language = "en"


def duplicate_stats(items: list[str]) -> tuple[int, int]:
    """(number of elements equal to an earlier one, their total length): datatrove's
    `find_duplicates`. Every occurrence but the first of each distinct value counts."""
    distinct = set(items)
    return len(items) - len(distinct), sum(map(len, items)) - sum(map(len, distinct))


_BASE = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)


class _Powers:
    """B^k and B^-k (mod 2^64) for k < len, grown on demand and shared by all documents."""

    def __init__(self) -> None:
        self.pows = np.ones(1, dtype=np.uint64)
        self.inv_pows = np.ones(1, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.pows) < n:
            size = max(n, 2 * len(self.pows), 1 << 14)
            self.pows = self._table(_BASE, size)
            self.inv_pows = self._table(_BASE_INV, size)
        return self.pows, self.inv_pows

    @staticmethod
    def _table(base: int, size: int) -> np.ndarray:
        table = np.full(size, base, dtype=np.uint64)
        table[0] = 1
        return np.multiply.accumulate(table)  # wraps modulo 2**64


_POWERS = _Powers()


class NGramHashes:
    """64-bit hashes of the character content of the word n-grams `sep.join(words[i:i+n])`.

    With code points c_j of the joined text, Q[k] = Σ_{j<k} (c_j + 1)·B⁻ʲ (mod 2⁶⁴), and
    the substring [s, e) hashes to (Q[e] − Q[s])·Bˢ, which depends on its characters only.
    """

    def __init__(self, words: tuple[str, ...] | list[str], sep: str):
        joined = sep.join(words)
        codes = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        codes += np.uint64(1)
        n_chars = len(codes)
        pows, inv_pows = _POWERS.get(n_chars + 1)
        self.prefix = np.zeros(n_chars + 1, dtype=np.uint64)
        np.cumsum(codes * inv_pows[:n_chars], out=self.prefix[1:])
        self.pows = pows
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.ends = np.cumsum(lengths + len(sep)) - len(sep)
        self.starts = self.ends - lengths
        self.n_words = len(words)

    def ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(hash, character length) of the n-gram starting at each word, for the
        n_words - n + 1 full windows."""
        s = self.starts[: self.n_words - n + 1]
        e = self.ends[n - 1 :]
        hashes = (self.prefix[e] - self.prefix[s]) * self.pows[s]
        return hashes, e - s

    def summary(self, ns: list[int]) -> tuple[list[int], list[int], list[int]] | None:
        """Upper bounds for each n of `ns` (none above n_words), from one sort of an
        (len(ns), n_words) table instead of one per n: the count of the most frequent
        n-gram, the largest count × length of an n-gram, and the total length of the
        n-grams equal to an earlier one. None when an n-gram is too long to summarize.

        The sort keys are the (mixed) hashes' top 44 bits with the n-gram's length below: keys
        that collide only merge n-grams, which can only raise these bounds.
        """
        n_rows, n_cols = len(ns), self.n_words
        cols = np.arange(n_cols)
        last = cols[None, :] + (np.asarray(ns)[:, None] - 1)  # each window's last word
        valid = last < n_cols
        e = self.ends[np.minimum(last, n_cols - 1)]
        s = np.broadcast_to(self.starts, e.shape)
        lengths = (e - s).astype(np.uint64)
        if int(lengths[valid].max()) >= 1 << _LENGTH_BITS:
            return None
        hashes = (self.prefix[e] - self.prefix[s]) * self.pows[s]
        # (times an odd constant, so that the top bits depend on every bit of the hash)
        keys = ((hashes * np.uint64(_MIX)) & np.uint64(_HASH_MASK)) | lengths
        # windows running past the end get distinct keys of length 0: unique, and inert
        filler = (np.arange(keys.size, dtype=np.uint64) + np.uint64(1)) << np.uint64(_LENGTH_BITS)
        ordered = np.sort(np.where(valid, keys, filler.reshape(keys.shape)), axis=1)
        run_start = np.ones((n_rows, n_cols), dtype=bool)
        run_start[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        count_so_far = cols - np.maximum.accumulate(np.where(run_start, cols, 0), axis=1) + 1
        sorted_lengths = (ordered & np.uint64(_LENGTH_MASK)).astype(np.int64)
        max_count = count_so_far.max(axis=1)
        max_chars = (count_so_far * sorted_lengths).max(axis=1)
        duplicate_chars = np.where(run_start, 0, sorted_lengths).sum(axis=1)
        return max_count.tolist(), max_chars.tolist(), duplicate_chars.tolist()


_MIX = 0xD6E8FEB86659FD93
_LENGTH_BITS = 20
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_HASH_MASK = ((1 << 64) - 1) ^ _LENGTH_MASK


def top_ngram_chars(hashes: np.ndarray, lengths: np.ndarray) -> int:
    """Length × count of the most frequent n-gram, ties going to the one seen first
    (datatrove's `Counter.most_common(1)`)."""
    _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    top = counts.max()
    where = first[counts == top].min()
    return int(lengths[where]) * int(top)


def repeated_ngram_chars(hashes: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """datatrove's `find_all_duplicate`: walk the n-grams, adding each new one to a set;
    one already in it adds its length and skips the next n - 1 positions."""
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(counts[inverse.reshape(-1)] > 1)
    # n-grams that occur once are never repeats and their insertion into the set does
    # not matter: walk only over the others, honouring the skips.
    seen: set[int] = set()
    repeated = 0
    next_visit = 0
    for pos, key, length in zip(candidates.tolist(), hashes[candidates].tolist(), lengths[candidates].tolist()):
        if pos < next_visit:
            continue
        if key in seen:
            repeated += length
            next_visit = pos + n
        else:
            seen.add(key)
            next_visit = pos + 1
    return repeated


def _bound(frac: float, text_len: int) -> int:
    """The largest character count c with c / text_len <= frac (float division, as the
    rules compare), so that "c / text_len > frac" is "c > bound"."""
    c = math.floor(frac * text_len)
    while c / text_len > frac:
        c -= 1
    while (c + 1) / text_len <= frac:
        c += 1
    return c


_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile("\n+")


class GopherRepetition:
    """datatrove's GopherRepetitionFilter."""

    type: ClassVar[str] = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig):
        self.cfg = cfg

    def __call__(self, doc: Document) -> str | None:
        c = self.cfg
        text = doc.text
        if not text:
            return "empty"

        paragraphs = _PARAGRAPHS.split(text.strip())
        n_dup, dup_chars = duplicate_stats(paragraphs)
        if c.dup_para_frac and n_dup / len(paragraphs) > c.dup_para_frac:
            return "dup_para_frac"
        if c.dup_para_char_frac and dup_chars / len(text) > c.dup_para_char_frac:
            return "dup_para_char_frac"

        lines = _LINES.split(text)
        n_dup, dup_chars = duplicate_stats(lines)
        if c.dup_line_frac and n_dup / len(lines) > c.dup_line_frac:
            return "dup_line_frac"
        if c.dup_line_char_frac and dup_chars / len(text) > c.dup_line_char_frac:
            return "dup_line_char_frac"

        words = split_words_cached(text)
        return self._top_ngram_rule(words, len(text)) or self._duplicated_ngram_rule(words, len(text))

    def _top_ngram_rule(self, words: tuple[str, ...], text_len: int) -> str | None:
        """"top_{n}_gram" if the most frequent n-gram covers too much of the text."""
        rules = [(n, frac) for n, frac in self.cfg.top_n_grams if n <= len(words)]
        if not rules:
            return None
        spaced = NGramHashes(words, " ")
        summary = spaced.summary([n for n, _ in rules])
        for i, (n, frac) in enumerate(rules):
            if summary and summary[0][i] == 1:  # all distinct: the first n-gram is "the most common"
                top = int(spaced.ends[n - 1] - spaced.starts[0])
            elif summary and summary[1][i] <= _bound(frac, text_len):
                continue  # cannot exceed the threshold
            else:
                top = top_ngram_chars(*spaced.ngrams(n))
            if top / text_len > frac:
                return f"top_{n}_gram"
        return None

    def _duplicated_ngram_rule(self, words: tuple[str, ...], text_len: int) -> str | None:
        """"duplicated_{n}_n_grams" if repeated n-grams cover too much of the text."""
        rules = [(n, frac) for n, frac in self.cfg.dup_n_grams if n <= len(words)]
        if not rules:
            return None
        glued = NGramHashes(words, "")
        summary = glued.summary([n for n, _ in rules])
        for i, (n, frac) in enumerate(rules):
            # every repeat counted is an n-gram equal to an earlier one: summary[2] bounds the sum
            if summary and summary[2][i] <= _bound(frac, text_len):
                continue
            if repeated_ngram_chars(*glued.ngrams(n), n) / text_len > frac:
                return f"duplicated_{n}_n_grams"
        return None


# --------------------------------------------------------------------------- C4 quality

CITATION_REGEX = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
ELLIPSIS = "..."
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4QualityConfig(StepConfig):
    """C4's line and page rules (Raffel et al. 2020); keeps only the good lines.
    -1 turns off min_num_sentences, min_words_per_line, max_word_length."""

    type: Literal["c4_quality"]
    split_paragraph: bool = True  # lines are "\n"-separated; False: sentences instead
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    language: Language = "en"


class C4Quality:
    """datatrove's C4QualityFilter: drops bad lines (editing doc.text), or the document."""

    type: ClassVar[str] = "c4_quality"

    def __init__(self, cfg: C4QualityConfig):
        self.cfg = cfg

    def __call__(self, doc: Document) -> str | None:
        c = self.cfg
        lines = doc.text.splitlines() if c.split_paragraph else split_sentences(doc.text)
        num_sentences = 0
        kept_lines = []
        for line in lines:
            line = line.strip()
            words = line.split()
            if c.max_word_length != -1 and any(len(word) > c.max_word_length for word in words):
                continue
            if c.remove_citations:
                line = CITATION_REGEX.sub("", line)
            if c.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
                continue
            if len(words) < c.min_words_per_line:
                continue
            line_l = line.lower()
            if c.filter_lorem_ipsum and "lorem ipsum" in line_l:
                return "lorem_ipsum"
            if c.filter_javascript and "javascript" in line_l:
                continue
            if c.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if c.filter_policy and any(p in line_l for p in POLICY_SUBSTRINGS):
                continue
            # only whether the total reaches min_num_sentences matters: stop counting then
            if c.min_num_sentences != -1 and num_sentences < c.min_num_sentences:
                num_sentences += max(1, count_sentences(line)) if c.split_paragraph else 1
            kept_lines.append(line)
        if num_sentences < c.min_num_sentences:
            return "too_few_sentences"
        doc.text = ("\n" if c.split_paragraph else " ").join(kept_lines).strip()
        return None


# --------------------------------------------------------------------------- FineWeb quality


class FineWebQualityConfig(StepConfig):
    """FineWeb's own rules (Penedo et al. 2024): share of lines ending in terminal
    punctuation, of short lines, of duplicated line characters, newlines per word."""

    type: Literal["fineweb_quality"]
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    stop_chars: tuple[str, ...] | None = None  # None: datatrove's TERMINAL_PUNCTUATION
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3
    language: Language = "en"


class FineWebQuality:
    """datatrove's FineWebQualityFilter."""

    type: ClassVar[str] = "fineweb_quality"

    def __init__(self, cfg: FineWebQualityConfig):
        self.cfg = cfg
        self.stop_chars = tuple(TERMINAL_PUNCTUATION) if cfg.stop_chars is None else tuple(cfg.stop_chars)

    def __call__(self, doc: Document) -> str | None:
        c = self.cfg
        text = doc.text
        lines = [line for line in text.split("\n") if line.strip() != ""]
        if not lines:
            return "empty"
        ratio = sum(1 for line in lines if line.endswith(self.stop_chars)) / len(lines)
        if ratio < c.line_punct_thr and not (ratio == 0 and c.line_punct_exclude_zero):
            return "line_punct_ratio"

        ratio = sum(1 for line in lines if len(line) <= c.short_line_length) / len(lines)
        if ratio > c.short_line_thr:
            return "short_line_ratio"

        ratio = duplicate_stats(lines)[1] / (len(text) - text.count("\n"))
        if ratio > c.char_duplicates_ratio:
            return "char_dup_ratio"

        if text.count("\n") / count_words(text) > c.new_line_ratio:
            return "list_ratio"
        return None
