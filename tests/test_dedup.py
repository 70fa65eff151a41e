"""Dedup through files: exact and near duplicates found, the first kept, results
independent of partitions, and the MinHash collision rate as LSH predicts."""

import numpy as np
import pytest

from data_pipelines import dedup

BASE = (
    "PostgreSQL provides a rich set of tools for developers to manage concurrent access to data. "
    "Internally, data consistency is maintained by using a multiversion model. This means that each "
    "SQL statement sees a snapshot of data as it was some time ago, regardless of the current state "
    "of the underlying data. This prevents statements from viewing inconsistent data produced by "
    "concurrent transactions performing updates on the same data rows."
)


def _edit(text: str, every: int, offset: int = 0) -> str:
    words = text.split()
    return " ".join(w + "x" if i % every == offset else w for i, w in enumerate(words))


def _long_document() -> str:
    """A real ~600-word page from the shipped quickstart corpus."""
    import gzip
    import json

    from conftest import ROOT

    with gzip.open(ROOT / "data" / "quickstart" / "valid.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    return next(t for t in texts if 600 <= len(t.split()) <= 1500)


def test_normalize_ignores_case_punctuation_numbers_and_accents():
    assert dedup.normalize("Héllo,   WORLD!\n42 apples; 3.14") == dedup.normalize("hello world 7 apples 2")
    assert dedup.exact_key("A  b.") == dedup.exact_key("a b")
    assert dedup.exact_key("a b") != dedup.exact_key("a c")


def _run(tmp_path, keys_by_gid, bands, partitions):
    sig = str(tmp_path / "sig")
    for task, chunk in enumerate([list(keys_by_gid.items())[::2], list(keys_by_gid.items())[1::2]]):
        writer = dedup.SignatureWriter(sig, task, bands, partitions)
        for gid, keys in chunk:
            writer.add(gid, keys)
        writer.close()
    edge_files = []
    for b in range(bands):
        for p in range(partitions):
            out = str(tmp_path / f"edges-{b}-{p}.npy")
            dedup.bucket_edges(sig, b, p, out)
            edge_files.append(out)
    removed_path = str(tmp_path / "removed.npy")
    dedup.removed_gids(edge_files, removed_path)
    return dedup.RemovedSet(removed_path)


@pytest.mark.parametrize("partitions", [1, 4])
def test_exact_duplicates_keep_the_first(tmp_path, partitions):
    texts = {10: "one doc", 3: "ONE doc!", 7: "another", 12: "one   doc", 1: "unique"}
    removed = _run(tmp_path, {g: [dedup.exact_key(t)] for g, t in texts.items()}, 1, partitions)
    assert [g for g in sorted(texts) if g in removed] == [10, 12]  # 3 is the first "one doc"


def test_minhash_links_near_duplicates_transitively(tmp_path):
    hasher = dedup.MinHasher(5, 14, 8, seed=1)
    page = _long_document()
    docs = {
        0: page,
        1: _edit(page, 150),  # one word in 150 changed: Jaccard ~0.94 with 0
        2: _edit(_edit(page, 150), 150, 75),  # ~0.94 with 1, ~0.88 with 0
        3: BASE,
        4: "short text",  # fewer than 5 words after normalization: never grouped
    }
    keys = {g: [(int(k), 0) for k in hasher.band_keys(t)] for g, t in docs.items() if hasher.band_keys(t) is not None}
    removed = _run(tmp_path, keys, 14, 2)
    assert [g for g in docs if g in removed] == [1, 2]


def test_minhash_detection_follows_the_lsh_curve():
    """Pairs with Jaccard similarity s collide in some band with probability
    1 - (1 - s^8)^14: ~0.92 at 0.8 and ~0.05 at 0.5 (empirical over 200 pairs)."""
    hasher = dedup.MinHasher(5, 14, 8, seed=1)
    rng = np.random.default_rng(0)

    def pair_with_jaccard(target):
        # Two sets of shingles sharing a fraction; build texts whose 5-gram sets have that overlap.
        shared = int(200 * 2 * target / (1 + target))
        common = rng.integers(0, 1 << 62, shared, dtype=np.int64)
        a = np.concatenate([common, rng.integers(0, 1 << 62, 200 - shared, dtype=np.int64)])
        b = np.concatenate([common, rng.integers(0, 1 << 62, 200 - shared, dtype=np.int64)])
        return a.astype(np.uint64), b.astype(np.uint64)

    def collide(a, b):
        def keys(shingles):
            with np.errstate(over="ignore"):
                phv = (shingles[:, None] * hasher.a + hasher.b) % dedup._MERSENNE
            return phv.min(axis=0).reshape(14, 8)
        return bool(np.any(np.all(keys(a) == keys(b), axis=1)))

    rates = {s: np.mean([collide(*pair_with_jaccard(s)) for _ in range(200)]) for s in (0.5, 0.8, 0.9)}
    assert rates[0.5] < 0.15
    assert 0.8 < rates[0.8] <= 1.0
    assert rates[0.9] > 0.95
