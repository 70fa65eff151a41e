"""datatrove's URLFilter: drops documents whose URL (`doc.metadata["url"]`) is on a
block list, with the same lists, rules, order and rule names (datatrove 0.10.1).

A document is dropped when, in this order,
- its registered domain is a blocked domain ("domain"),
- its full host name is a blocked domain ("subdomain"),
- the URL itself is a blocked URL ("url"),
- a banned word is one of the URL's alphanumeric runs ("hard_blacklisted"),
- at least `soft_word_threshold` soft-banned words are ("soft_blacklisted"),
- a banned subword occurs in the URL stripped of non-alphanumerics and lowercased
  ("blacklisted_subword").

The integrated lists ship in data_pipelines/assets (see NOTICE there): datatrove's
banned_words / banned_subwords / soft_banned_words and the UT1 blocklist's "domains"
and "urls" (xz-compressed). The 4.5M domains are not loaded into a set: on first use
their 64-bit hashes (BLAKE2b) are sorted into a numpy array cached on disk (under
$XDG_CACHE_HOME/maxllm or ~/.cache/maxllm, keyed by the asset's checksum, written to a
temporary name and renamed), which every process memory-maps and searches with
np.searchsorted. A false "domain" match needs a 64-bit collision: ~4.5M/2⁶⁴ per URL.

Domains are split as datatrove does with tldextract, but offline: the public suffix
list snapshot bundled with tldextract (datatrove's default fetches the live list).
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import re
import tempfile
from functools import cache, partial
from operator import methodcaller
from pathlib import Path
from typing import ClassVar, Iterable, Literal

import numpy as np

from data_pipelines.document import Document, StepConfig

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DOMAINS_ASSET = ASSETS / "ut1_domains.xz"
URLS_ASSET = ASSETS / "ut1_urls.xz"

_NON_ALNUM = re.compile(r"[^a-zA-Z0-9]+")


class URLFilterConfig(StepConfig):
    """Block lists applied to the document's URL (metadata "url"). The extra_* and word
    lists add to the integrated ones (or replace them with use_integrated_lists=False);
    entries starting with "#" are ignored, as in datatrove."""

    type: Literal["url_filter"]
    soft_word_threshold: int = 2
    extra_domains: tuple[str, ...] | None = None
    extra_urls: tuple[str, ...] | None = None
    banned_words: tuple[str, ...] | None = None
    banned_subwords: tuple[str, ...] | None = None
    soft_banned_words: tuple[str, ...] | None = None
    use_integrated_lists: bool = True


def normalize(text: str) -> str:
    """Lowercase alphanumerics only (datatrove's url_filter.normalize)."""
    return _NON_ALNUM.sub("", text).lower()


def parse_list(entries: Iterable[str], do_normalize: bool = True) -> set[str]:
    """datatrove's parse_list: drop "#" comments, then normalize or strip each entry."""
    return {normalize(x) if do_normalize else x.strip() for x in entries if x and x[0] != "#"}


def _read_lines(path: Path) -> list[str]:
    """Lines of a text asset (xz-compressed if it ends in .xz), newlines kept."""
    if path.suffix == ".xz":
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return f.readlines()
    with open(path, encoding="utf-8") as f:
        return f.readlines()


def hash64(text: str) -> int:
    """Stable 64-bit hash of a string (BLAKE2b of its UTF-8, little-endian), the key of
    the domain array."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def cache_dir() -> Path:
    """Where derived data is cached: $XDG_CACHE_HOME/maxllm or ~/.cache/maxllm."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "maxllm"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# Printable ASCII and newlines: a file of only these and without "#" comment lines needs
# none of datatrove's text handling (str.strip, comments, universal newlines).
_PLAIN_BYTES = bytes(range(0x21, 0x7F)) + b"\n"


def domain_list_keys(raw: bytes) -> list[bytes]:
    """Entries of a domain list file (datatrove's parse_list(do_normalize=False) of its
    lines) as UTF-8 bytes; fast for the plain ASCII one-domain-a-line case."""
    plain = not raw.translate(None, delete=_PLAIN_BYTES) and not raw.startswith(b"#") and b"\n#" not in raw
    if plain:
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # a final newline ends the last line
        return lines
    text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")  # universal newlines, as open()
    return [d.encode("utf-8") for d in parse_list(text, do_normalize=False)]


def build_domain_hashes(keys: Iterable[bytes]) -> np.ndarray:
    """Sorted unique uint64 hashes (`hash64`) of the given UTF-8 domains."""
    digests = b"".join(map(methodcaller("digest"), map(partial(hashlib.blake2b, digest_size=8), keys)))
    hashes = np.sort(np.frombuffer(digests, dtype="<u8").astype(np.uint64))
    if len(hashes) > 1:
        hashes = hashes[np.concatenate(([True], hashes[1:] != hashes[:-1]))]
    return hashes


@cache
def integrated_domain_hashes(asset: Path = DOMAINS_ASSET) -> np.ndarray:
    """The UT1 domain hashes, memory-mapped from the on-disk cache (built on first use,
    in a few seconds)."""
    path = cache_dir() / f"ut1_domains-{_file_digest(asset)}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with lzma.open(asset, "rb") as f:
            hashes = build_domain_hashes(domain_list_keys(f.read()))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, hashes)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return np.load(path, mmap_mode="r")


@cache
def integrated_urls() -> frozenset[str]:
    return frozenset(parse_list(_read_lines(URLS_ASSET), do_normalize=False))


@cache
def integrated_words(name: str) -> frozenset[str]:
    """One of datatrove's word lists (banned_words, banned_subwords, soft_banned_words)."""
    return frozenset(parse_list(_read_lines(ASSETS / f"{name}.txt")))


@cache
def _tld_extractor():
    from tldextract import TLDExtract

    # suffix_list_urls=(): no download; cache_dir=None: no cached live list either, so
    # the bundled snapshot is always the one used.
    return TLDExtract(cache_dir=None, suffix_list_urls=())


def _host_function():
    """tldextract's own URL -> host step (the only input of its domain split), so that
    decisions can be cached per host; None if this tldextract version lacks it."""
    try:
        from tldextract.remote import lenient_netloc
    except ImportError:
        return None
    return lenient_netloc


MAX_CACHED_HOSTS = 1 << 16


class SubwordMatcher:
    """Whether any of a set of words occurs as a substring (Aho-Corasick automaton)."""

    def __init__(self, words: Iterable[str]):
        import ahocorasick

        self.automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        for word in words:
            if word:
                self.automaton.add_word(word, len(self.automaton))
        self.empty = len(self.automaton) == 0
        if not self.empty:
            self.automaton.make_automaton()

    def search(self, text: str) -> bool:
        return not self.empty and next(self.automaton.iter(text), None) is not None


class URLFilter:
    """datatrove's URLFilter (see the module docstring)."""

    type: ClassVar[str] = "url_filter"

    def __init__(self, cfg: URLFilterConfig):
        self.cfg = cfg
        integrated = cfg.use_integrated_lists
        self.extra_domains = parse_list(cfg.extra_domains or (), do_normalize=False)
        self.domain_hashes = integrated_domain_hashes() if integrated else np.empty(0, dtype=np.uint64)
        self.urls = parse_list(cfg.extra_urls or (), do_normalize=False) | (integrated_urls() if integrated else set())
        self.banned_words = parse_list(cfg.banned_words or ()) | (
            integrated_words("banned_words") if integrated else set())
        self.soft_banned_words = parse_list(cfg.soft_banned_words or ()) | (
            integrated_words("soft_banned_words") if integrated else set())
        self.subwords = SubwordMatcher(
            parse_list(cfg.banned_subwords or ()) | (integrated_words("banned_subwords") if integrated else set())
        )
        self.extract = _tld_extractor()
        self.host_of = _host_function()
        self._host_rule: dict[str, str | None] = {}

    def _blocked_domain(self, domain: str) -> bool:
        if domain in self.extra_domains:
            return True
        arr = self.domain_hashes
        if not len(arr):
            return False
        h = np.uint64(hash64(domain))
        i = int(np.searchsorted(arr, h))
        return i < len(arr) and arr[i] == h

    def _domain_rule(self, url: str) -> str | None:
        """"domain" or "subdomain" if the URL's host is blocked, remembered per host."""
        host = self.host_of(url) if self.host_of else None
        if host is not None and host in self._host_rule:
            return self._host_rule[host]
        info = self.extract(url)
        registered = getattr(info, "top_domain_under_public_suffix", None)
        if registered is None:  # tldextract < 5.3
            registered = info.registered_domain
        if self._blocked_domain(registered):
            rule = "domain"
        elif self._blocked_domain(info.fqdn):
            rule = "subdomain"
        else:
            rule = None
        if host is not None:
            if len(self._host_rule) >= MAX_CACHED_HOSTS:
                self._host_rule.clear()
            self._host_rule[host] = rule
        return rule

    def __call__(self, doc: Document) -> str | None:
        url = doc.metadata.get("url")
        if not url or not isinstance(url, str):
            # datatrove asserts; a pipeline must not crash on one record, so it is
            # rejected under its own rule (a corpus without URLs shows 100% here).
            return "missing_url"
        rule = self._domain_rule(url)
        if rule:
            return rule
        if url in self.urls:
            return "url"
        url_words = set(_NON_ALNUM.split(url))
        if not self.banned_words.isdisjoint(url_words):
            return "hard_blacklisted"
        if len(self.soft_banned_words.intersection(url_words)) >= self.cfg.soft_word_threshold:
            return "soft_blacklisted"
        if self.subwords.search(normalize(url)):
            return "blacklisted_subword"
        return None
