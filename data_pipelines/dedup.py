"""Exact and MinHash deduplication in three stages that exchange files on disk, so
the corpus never has to fit in memory:

1. signatures (inside each pipeline task): per document, the keys it is grouped
   by, written as (key, gid) records into `partitions` files by key range;
2. buckets (one task per band x partition): sort one file set by key; documents
   sharing a key are linked (edges to the first document of the group);
3. clusters (one task): union-find over the edges; every member of a cluster but
   the first (lowest gid, i.e. earliest in input order) is removed.

A gid identifies a document by where it was read: input file index << 32 | record
position, so decisions never depend on how work was split. The removed gids are
one sorted array that the next pipeline pass reads memory-mapped.

Exact dedup keys a document by a 128-bit hash of its normalized text (one band).
MinHash keys it by `bands` hashes of `rows` minhashes each, over hashed word
n-gram shingles of the normalized text; datatrove's defaults (5-grams, 14 x 8,
64-bit) detect pairs with Jaccard similarity 0.8 with probability 0.92.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import numpy as np
import xxhash

from data_pipelines import io as dio

_MERSENNE = np.uint64((1 << 61) - 1)
_NUMBERS = re.compile(r"\d+(?:[.,]\d+)?")
_SPACES = re.compile(r"\s+")
RECORD = np.dtype([("key", "<u8"), ("key2", "<u8"), ("gid", "<u8")])


# ---------------------------------------------------------------------------------
# Normalization and keys


@lru_cache(maxsize=1)
def _punctuation_table() -> dict[int, str]:
    """Every Unicode punctuation or symbol character maps to a space."""
    return {
        cp: " "
        for cp in range(0x110000)
        if unicodedata.category(chr(cp))[0] in "PS"
    }


def normalize(text: str) -> str:
    """Lowercase, numbers to 0, punctuation and symbols to spaces, whitespace
    collapsed, accents stripped: near-identical texts normalize alike."""
    text = _NUMBERS.sub("0", text.lower()).translate(_punctuation_table())
    text = _SPACES.sub(" ", text).strip()
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return text


def exact_key(text: str) -> tuple[int, int]:
    digest = xxhash.xxh3_128_intdigest(normalize(text).encode())
    return digest >> 64, digest & 0xFFFFFFFFFFFFFFFF


class MinHasher:
    """Band keys of a document: `bands` 64-bit hashes, each of `rows` minhashes."""

    def __init__(self, n_grams: int, bands: int, rows: int, seed: int):
        self.n, self.bands, self.rows = n_grams, bands, rows
        gen = np.random.RandomState(seed)
        count = bands * rows
        self.a = gen.randint(1, _MERSENNE, dtype=np.uint64, size=(1, count))
        self.b = gen.randint(0, _MERSENNE, dtype=np.uint64, size=(1, count))
        # Powers of an odd constant combine n word hashes into one shingle hash.
        self.powers = np.array([pow(0x9E3779B97F4A7C15, n_grams - 1 - i, 1 << 64) for i in range(n_grams)], np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """One 64-bit hash per word n-gram of the normalized text (empty when the
        text has fewer than n words, as in datatrove: such documents are kept)."""
        words = normalize(text).split()
        if len(words) < self.n:
            return np.empty(0, np.uint64)
        hashes = np.fromiter((xxhash.xxh64_intdigest(w.encode()) for w in words), np.uint64, len(words))
        windows = np.lib.stride_tricks.sliding_window_view(hashes, self.n)
        with np.errstate(over="ignore"):
            mixed = (windows * self.powers).sum(axis=1, dtype=np.uint64)
        return _splitmix(mixed)

    def band_keys(self, text: str) -> np.ndarray | None:
        shingles = self.shingles(text)
        if shingles.size == 0:
            return None
        with np.errstate(over="ignore"):
            # As datatrove: (a * x + b) mod (2^61 - 1), the product wrapping at 2^64.
            phv = (shingles[:, None] * self.a + self.b) % _MERSENNE
        signature = phv.min(axis=0).reshape(self.bands, self.rows)
        return np.array([xxhash.xxh64_intdigest(band.tobytes()) for band in signature], np.uint64)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


# ---------------------------------------------------------------------------------
# Stage 1: signature files (written by pipeline tasks)


class SignatureWriter:
    """Collects (key, gid) records of one task and writes one file per band and
    partition: `<dir>/band-BB/part-PPP/task-TTTTT.npy`."""

    def __init__(self, directory: str, task: int, bands: int, partitions: int):
        self.directory, self.task, self.bands, self.partitions = directory, task, bands, partitions
        self.records: list[list[tuple[int, int, int]]] = [[] for _ in range(bands)]

    def add(self, gid: int, keys: list[tuple[int, int]]) -> None:
        for band, (k1, k2) in enumerate(keys):
            self.records[band].append((k1, k2, gid))

    def close(self) -> None:
        for band, records in enumerate(self.records):
            array = np.array(records, dtype=RECORD)
            which = array["key"] % np.uint64(self.partitions)
            for part in range(self.partitions):
                path = dio.join(self.directory, f"band-{band:02d}", f"part-{part:03d}", f"task-{self.task:05d}.npy")
                with dio.atomic_write(path) as f:
                    np.save(f, array[which == part])


# ---------------------------------------------------------------------------------
# Stage 2: buckets -> edges


def bucket_edges(directory: str, band: int, part: int, out_path: str) -> int:
    """Sorts one band/partition and writes edges (first gid, other gid) for every
    group of documents sharing a key. Returns the number of edges."""
    folder = dio.join(directory, f"band-{band:02d}", f"part-{part:03d}")
    arrays = [_load_npy(dio.join(folder, name)) for name in dio.listdir(folder) if name.endswith(".npy")]
    records = np.concatenate(arrays) if arrays else np.empty(0, RECORD)
    records.sort(order=("key", "key2", "gid"))
    same = (records["key"][1:] == records["key"][:-1]) & (records["key2"][1:] == records["key2"][:-1])
    # Group starts, and for every record the first gid of its group.
    starts = np.flatnonzero(np.concatenate([[True], ~same])) if records.size else np.empty(0, np.int64)
    group_first = np.repeat(records["gid"][starts], np.diff(np.append(starts, records.size)))
    linked = np.concatenate([[False], same]) if records.size else np.empty(0, bool)
    edges = np.stack([group_first[linked], records["gid"][linked]], axis=1).astype(np.uint64)
    with dio.atomic_write(out_path) as f:
        np.save(f, edges)
    return int(edges.shape[0])


# ---------------------------------------------------------------------------------
# Stage 3: clusters -> removed gids


def removed_gids(edge_files: list[str], out_path: str) -> tuple[int, int]:
    """Union-find over all edges; writes the sorted gids to remove (every cluster
    member but its lowest gid). Returns (clusters, removed)."""
    edges = [_load_npy(p) for p in edge_files]
    edges = np.concatenate(edges) if edges else np.empty((0, 2), np.uint64)
    if edges.size == 0:
        removed = np.empty(0, np.uint64)
        clusters = 0
    else:
        nodes, flat = np.unique(edges, return_inverse=True)
        pairs = flat.reshape(-1, 2)
        roots = _union_find(len(nodes), pairs)
        # The root of each set is its smallest index, i.e. its lowest gid (nodes are sorted).
        removed = nodes[roots != np.arange(len(nodes))]
        clusters = int(np.sum(roots == np.arange(len(nodes))))
    with dio.atomic_write(out_path) as f:
        np.save(f, np.sort(removed))
    return clusters, int(removed.size)


def _union_find(n: int, pairs: np.ndarray) -> np.ndarray:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
    return np.array([find(i) for i in range(n)], np.int64)


class RemovedSet:
    """Membership test against a sorted removed-gid array (memory-mapped)."""

    def __init__(self, path: str):
        self.gids = _load_npy(path, mmap=True)

    def __contains__(self, gid: int) -> bool:
        i = np.searchsorted(self.gids, np.uint64(gid))
        return bool(i < self.gids.size and self.gids[i] == gid)


def _load_npy(path: str, mmap: bool = False) -> np.ndarray:
    if not dio.is_remote(path):
        return np.load(path, mmap_mode="r" if mmap else None)
    with dio.open_read(path) as f:
        return np.load(f)
