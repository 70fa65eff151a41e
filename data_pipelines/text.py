"""English word splitting and sentence counting as datatrove does them, without spaCy.

datatrove's quality filters split English text into words with spaCy
(`spacy.blank("en")` plus the "sentencizer" pipe): `split_into_words` keeps every
token's text, stripped, dropping whitespace tokens; C4 counts sentences with the
sentencizer. Calling spaCy costs a Doc per call and runs its large affix regexes on
every whitespace-separated chunk. Here:

- `split_words(text)` splits on whitespace with `str.split` (exactly spaCy's chunking:
  runs of `str.isspace` characters) and maps each chunk through a cache (a dict whose
  misses tokenize the chunk), so a chunk is tokenized once per process and the
  per-document work is C-level `str.split`, `map` and `itertools.chain`.
- A miss takes a shortcut for the common shapes (letters only, digits only, letters
  plus one punctuation mark that spaCy splits off), or else runs a port of spaCy's own
  algorithm (`Tokenizer._split_affixes` / `_attach_tokens` and its special-case
  matcher) with spaCy's English prefix, suffix, infix and URL regexes and special
  cases ("haven't" -> "have" "n't", "e.g.", emoticons...), as spaCy 3.8 builds them,
  stored in `assets/spacy_en_tokenizer.json` (spaCy is MIT-licensed; the file is
  written by `tools/datatrove_agreement.py --write-spacy-rules`).
- `count_sentences(text)` reproduces the sentencizer: a sentence starts at the first
  token that is neither punctuation nor a sentence-final character after a token that
  is a sentence-final character ("!", ".", "?", ...). Chunks map to one letter per
  token, and one regex counts the boundaries.

On the 5,000 documents of the web sample, words and per-line sentence counts equal
spaCy's for every document. Known differences with spaCy, by construction: a
special-case match spanning two whitespace-separated chunks (which spaCy finds but
then leaves alone) cannot block an overlapping match inside one chunk here; spaCy's
retry without "IS_ALPHA" when spaCy raises (spaCy 3.8 does not) is not needed.

PUNCTUATION, TERMINAL_PUNCTUATION and PUNCTUATION_SET are copied from datatrove
(src/datatrove/utils/text.py, Apache-2.0, Copyright HuggingFace).
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from dataclasses import dataclass
from functools import cache, lru_cache
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable

ASSETS = Path(__file__).resolve().parent / "assets"

# --------------------------------------------------------------------------- datatrove constants
# Copied from datatrove 0.10.1, src/datatrove/utils/text.py (Apache-2.0).

PUNCTUATION = (
    "!/\u2014\u201d:\uff05\uff11\u3008&(\u3001\u2501\\\u3010#%\u300c\u300d\uff0c\u3011\uff1b+^]~\u201c\u300a"
    "\u201e';\u2019{|\u2236\xb4[=-`*\uff0e\uff08\u2013\uff1f\uff01\uff1a$\uff5e\xab\u3009,><\u300b)?"
    "\uff09\u3002\u2026@_.\"}\u25ba\xbb"
) + "".join(map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))))

TERMINAL_PUNCTUATION = frozenset(
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965\u104a"
    "\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944\u1945"
    "\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d"
    "\u2047\u2048\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce"
    "\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f"
    "\uff61\U00010a56\U00010a57\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87"
    "\U00010f88\U00010f89\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141"
    "\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239"
    "\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca"
    "\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3"
    "\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e"
    "\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7"
    "\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44"
    "\U00016e98\U0001bc9f\U0001da88"
)
PUNCTUATION_SET = frozenset(PUNCTUATION) | TERMINAL_PUNCTUATION

# --------------------------------------------------------------------------- spaCy's rules

# Chunks tokenized once are remembered; past this many the cache starts over.
MAX_CACHED_CHUNKS = 1 << 20


@dataclass(frozen=True)
class SpacyRules:
    """spaCy's English tokenizer rules (see assets/spacy_en_tokenizer.json)."""

    prefix_search: Callable[[str], re.Match | None]
    suffix_search: Callable[[str], re.Match | None]
    infix_finditer: Callable[[str], Iterable[re.Match]]
    url_match: Callable[[str], re.Match | None]
    specials: dict[str, tuple[str, ...]]
    # special cases that contain affixes, keyed by their tokens without special cases:
    # spaCy's matcher merges these token runs back (e.g. "x:)" -> "x" ":)")
    matcher: dict[tuple[str, ...], tuple[str, ...]]
    matcher_max_len: int
    matcher_first: frozenset[str]  # first tokens of the matcher's keys
    punct_chars: frozenset[str]


@cache
def spacy_rules() -> SpacyRules:
    """Load and compile spaCy's English rules (once per process)."""
    data = json.loads((ASSETS / "spacy_en_tokenizer.json").read_text(encoding="utf-8"))
    prefix, suffix, infix = re.compile(data["prefix"]), re.compile(data["suffix"]), re.compile(data["infix"])
    specials = {k: tuple(v) for k, v in data["rules"].items()}
    base = SpacyRules(prefix.search, suffix.search, infix.finditer, re.compile(data["url"]).match,
                      specials, {}, 0, frozenset(), frozenset(data["sentencizer_punct_chars"]))
    # spaCy's matcher holds the special cases that contain a prefix, suffix or infix (all
    # of them without faster_heuristics), as tokenized without special cases.
    matcher = {
        tuple(tokenize_chunk(text, base, with_specials=False)): tokens
        for text, tokens in specials.items()
        if not any(c.isspace() for c in text)  # cannot occur inside one chunk
        and (not data["faster_heuristics"] or prefix.search(text) or suffix.search(text)
             or next(infix.finditer(text), None))
    }
    return dataclasses.replace(base, matcher=matcher, matcher_max_len=max(map(len, matcher), default=0),
                               matcher_first=frozenset(key[0] for key in matcher))


def tokenize_chunk(chunk: str, rules: SpacyRules | None = None, with_specials: bool = True) -> list[str]:
    """spaCy's tokens for one whitespace-free chunk (the uncached, exact algorithm)."""
    r = rules or spacy_rules()
    if with_specials and chunk in r.specials:
        return list(r.specials[chunk])
    prefixes, core, suffixes = _split_affixes(chunk, r, with_specials)
    tokens = prefixes
    if core:
        if with_specials and core in r.specials:
            tokens.extend(r.specials[core])
        elif r.url_match(core):
            tokens.append(core)
        else:
            tokens.extend(_split_infixes(core, r))
    tokens.extend(reversed(suffixes))
    if with_specials and len(tokens) > 1 and r.matcher:
        tokens = _merge_special_runs(tokens, r)
    return tokens


def _split_affixes(string: str, r: SpacyRules, with_specials: bool) -> tuple[list[str], str, list[str]]:
    """Strip prefixes and suffixes as spaCy's `Tokenizer._split_affixes` does."""
    prefixes: list[str] = []
    suffixes: list[str] = []
    specials = r.specials if with_specials else {}
    last_size = 0
    while string and len(string) != last_size:
        if string in specials:
            break
        last_size = len(string)
        m = r.prefix_search(string)
        pre_len = m.end() - m.start() if m else 0
        if pre_len:
            prefix, minus_pre = string[:pre_len], string[pre_len:]
            if minus_pre and minus_pre in specials:
                prefixes.append(prefix)
                return prefixes, minus_pre, suffixes
        m = r.suffix_search(string[pre_len:])
        suf_len = m.end() - m.start() if m else 0
        if suf_len:
            suffix, minus_suf = string[-suf_len:], string[:-suf_len]
            if minus_suf and minus_suf in specials:
                suffixes.append(suffix)
                return prefixes, minus_suf, suffixes
        if pre_len and suf_len and pre_len + suf_len <= len(string):
            string = string[pre_len:-suf_len]
            prefixes.append(prefix)
            suffixes.append(suffix)
        elif pre_len:
            string = minus_pre
            prefixes.append(prefix)
        elif suf_len:
            string = minus_suf
            suffixes.append(suffix)
    return prefixes, string, suffixes


# Every infix rule consumes a non-word character (".", ",", "-", "/", "…", a symbol...).
_NON_WORD = re.compile(r"\W")


def _split_infixes(string: str, r: SpacyRules) -> list[str]:
    """Split on infixes (hyphens between letters, "..." etc.) as spaCy's `_attach_tokens`."""
    if not _NON_WORD.search(string):
        return [string]
    tokens = []
    start = 0
    for m in r.infix_finditer(string):
        s, e = m.span()
        if s == 0:
            continue
        if s != start:
            tokens.append(string[start:s])
        if s != e:
            tokens.append(string[s:e])
        start = e
    if string[start:]:
        tokens.append(string[start:])
    return tokens


def _merge_special_runs(tokens: list[str], r: SpacyRules) -> list[str]:
    """spaCy's special-case matcher: token runs spelling a special case with affixes
    (":)" split as ":" ")") become that special case's tokens; longest runs win, then
    the leftmost (spaCy's `_filter_special_spans`)."""
    spans = []
    for i in range(len(tokens)):
        if tokens[i] not in r.matcher_first:
            continue
        for j in range(i + 1, min(len(tokens), i + r.matcher_max_len) + 1):
            if tuple(tokens[i:j]) in r.matcher:
                spans.append((i, j))
    if not spans:
        return tokens
    spans.sort(key=lambda s: (-(s[1] - s[0]), s[0]))
    seen: set[int] = set()
    chosen = []
    for i, j in spans:
        if i not in seen and j - 1 not in seen:
            chosen.append((i, j))
        seen.update(range(i, j))
    out: list[str] = []
    pos = 0
    for i, j in sorted(chosen):
        out.extend(tokens[pos:i])
        out.extend(r.matcher[tuple(tokens[i:j])])
        pos = j
    out.extend(tokens[pos:])
    return out


# --------------------------------------------------------------------------- cached chunk maps

# Shapes whose tokens follow from a check or two instead of the whole algorithm:
# letters only (no prefix, suffix, infix or URL rule can match inside a run of
# letters: tests/test_filters.py checks every code point), digits only, and letters
# followed by one punctuation character that spaCy splits off as a suffix.
_LETTERS = re.compile(r"[^\W\d_]+|[0-9]+")
_LETTERS_THEN_PUNCT = re.compile(r"[^\W\d_]+[^\w\s]")


def _fast_tokens(chunk: str, r: SpacyRules) -> tuple[str, ...] | None:
    """spaCy's tokens for common simple chunks, or None to run the full algorithm."""
    if chunk in r.specials:
        return r.specials[chunk]
    if _LETTERS.fullmatch(chunk):
        return (chunk,)
    if _LETTERS_THEN_PUNCT.fullmatch(chunk) and not r.prefix_search(chunk):
        m = r.suffix_search(chunk)
        if m and m.start() == len(chunk) - 1:
            core = chunk[:-1]
            tokens = [*r.specials.get(core, (core,)), chunk[-1]]
            return tuple(_merge_special_runs(tokens, r))
    return None


class _ChunkTokens(dict):
    """chunk -> tuple of spaCy tokens, computed on a miss."""

    def __missing__(self, chunk: str) -> tuple[str, ...]:
        r = spacy_rules()
        tokens = _fast_tokens(chunk, r)
        if tokens is None:
            tokens = tuple(tokenize_chunk(chunk, r))
        if len(self) >= MAX_CACHED_CHUNKS:
            self.clear()
        self[chunk] = tokens
        return tokens


class _ChunkClasses(dict):
    """chunk -> one letter per token for the sentencizer: "P" sentence-final character,
    "p" other punctuation (every character in a Unicode P* category), "w" anything else."""

    def __missing__(self, chunk: str) -> str:
        punct_chars = spacy_rules().punct_chars
        classes = "".join(
            "P" if t in punct_chars else "p" if all(unicodedata.category(c)[0] == "P" for c in t) else "w"
            for t in CHUNK_TOKENS[chunk]
        )
        if len(self) >= MAX_CACHED_CHUNKS:
            self.clear()
        self[chunk] = classes
        return classes


CHUNK_TOKENS = _ChunkTokens()
CHUNK_CLASSES = _ChunkClasses()
_get_tokens = CHUNK_TOKENS.__getitem__
_get_classes = CHUNK_CLASSES.__getitem__


def clear_caches() -> None:
    """Forget every tokenized chunk and text (for cold-start benchmarks and tests)."""
    CHUNK_TOKENS.clear()
    CHUNK_CLASSES.clear()
    split_words_cached.cache_clear()


def split_words(text: str) -> list[str]:
    """The words datatrove's `split_into_words(text)` gives for English (spaCy's tokens,
    whitespace dropped)."""
    return list(chain.from_iterable(map(_get_tokens, text.split())))


@lru_cache(maxsize=4)
def split_words_cached(text: str) -> tuple[str, ...]:
    """`split_words` remembered for the last few texts, so that filters running one
    after the other on the same document tokenize it once (as datatrove's lru_cache)."""
    return tuple(chain.from_iterable(map(_get_tokens, text.split())))


def count_words(text: str) -> int:
    """len(split_words(text)), without building the list."""
    return sum(map(len, map(_get_tokens, text.split())))


# --------------------------------------------------------------------------- sentences

_WS_RUNS = re.compile(r"(\s+)")
# After a sentence-final token (and any punctuation), the next other token starts a sentence.
_SENTENCE_BREAK = re.compile(r"P[Pp]*w")


def token_classes(text: str) -> str:
    """One letter per spaCy token of `text` (see _ChunkClasses), whitespace tokens
    included: spaCy makes a token of each whitespace run other than one " " after a
    token (a leading run is always one)."""
    parts = _WS_RUNS.split(text)  # chunk, whitespace, chunk, ..., chunk (first/last may be "")
    out = []
    for k, part in enumerate(parts):
        if k % 2 == 0:
            if part:
                out.append(_get_classes(part))
        elif (k == 1 and not parts[0]) or part != " ":
            out.append("w")
    return "".join(out)


def count_sentences(text: str) -> int:
    """Number of sentences spaCy's sentencizer finds in `text` (0 when it has no token)."""
    classes = token_classes(text)
    if not classes:
        return 0
    return 1 + len(_SENTENCE_BREAK.findall(classes))


def sentence_ends(text: str) -> list[int]:
    """End offset of each sentence spaCy's sentencizer finds in `text` (its last token's
    end, whitespace tokens included)."""
    classes: list[str] = []
    ends: list[int] = []
    pos = 0
    parts = _WS_RUNS.split(text)
    for k, part in enumerate(parts):
        if k % 2 == 0:
            for token, cls in zip(_get_tokens(part), _get_classes(part)) if part else ():
                pos += len(token)
                classes.append(cls)
                ends.append(pos)
        else:
            pos += len(part)
            if (k == 1 and not parts[0]) or part != " ":
                classes.append("w")
                ends.append(pos)
    out = []
    seen_final = False
    for i, cls in enumerate(classes):
        if seen_final and cls == "w":
            out.append(ends[i - 1])
            seen_final = False
        elif cls == "P":
            seen_final = True
    if ends:
        out.append(ends[-1])
    return out


def split_sentences(text: str) -> list[str]:
    """datatrove's `split_into_sentences(text)` for English: `text` cut after each
    sentence's end, the last piece running to the end of `text`."""
    ends = sentence_ends(text)
    if not ends:
        return [text]
    cuts = [0, *ends[:-1], len(text)]
    return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
