"""Document sources: random-access collections of token arrays (one array per
document, EOS appended) that the Grain pipeline shuffles, shards and packs.

- `token_shards`: the ArrayRecord shards and manifest.json that data_pipelines
  writes (one uint32 record per document);
- `jsonl_documents`: JSONL text tokenized on the fly (small jobs);
- `seqio_documents`: a registered seqio Task, behind the optional `maxllm[seqio]`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grain
import numpy as np

from maxllm import storage
from maxllm.tokenizer import Tokenizer


class DataError(ValueError):
    """Training data that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class Manifest:
    """data_pipelines' tokens/manifest.json, checked against the shard files."""

    directory: Path
    shards: tuple[Path, ...]
    documents: int
    tokens: int
    tokenizer: Path
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    shard_documents: tuple[int, ...] = ()  # records in each shard, in order

    @staticmethod
    def read(path: str | Path) -> "Manifest":
        """`path`: a tokens/ folder or its manifest.json; on gs://, read from a local
        copy of the folder (ArrayRecord shards are read from local files)."""
        if storage.is_remote(str(path)):
            path = _local_tokens(str(path))
        path = Path(path)
        manifest_path = path / "manifest.json" if path.is_dir() else path
        if not manifest_path.is_file():
            raise DataError(f"{manifest_path}: manifest not found (point data.path at a data_pipelines tokens/ folder)")
        try:
            raw = json.loads(manifest_path.read_text())
            shards = [(manifest_path.parent / s["path"], int(s["documents"])) for s in raw["shards"]]
            tok = raw["tokenizer"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{manifest_path}: not a data_pipelines manifest ({type(e).__name__}: {e})") from None
        if raw.get("dtype") != "uint32" or raw.get("format") != "array_record":
            raise DataError(f"{manifest_path}: expected uint32 array_record shards, got {raw.get('dtype')} {raw.get('format')}")
        _check_shards(manifest_path, shards)
        tokenizer = manifest_path.parent / tok["path"]
        if not tokenizer.is_file():
            raise DataError(f"{tokenizer}: tokenizer named by {manifest_path} is missing")
        digest = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
        if digest != tok.get("sha256"):
            raise DataError(f"{tokenizer}: sha256 {digest[:12]}... does not match {manifest_path} ({str(tok.get('sha256'))[:12]}...)")
        return Manifest(manifest_path.parent, tuple(p for p, _ in shards), sum(n for _, n in shards),
                        int(raw.get("tokens", 0)), tokenizer, digest, int(tok["vocab_size"]), int(tok["eos_id"]),
                        tuple(n for _, n in shards))


def _local_tokens(url: str) -> Path:
    folder, name = (url.rsplit("/", 1) if url.endswith("manifest.json") else (url, ""))
    if not storage.isdir(folder):
        storage.check_bucket(url)
        raise DataError(f"{url}: no tokens folder here (point data.path at a data_pipelines tokens/ folder)")
    return storage.local_copy(folder) / name


def _check_shards(manifest_path: Path, shards: list[tuple[Path, int]]) -> None:
    from array_record.python.array_record_module import ArrayRecordReader

    for path, documents in shards:
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {manifest_path} is missing")
        try:
            reader = ArrayRecordReader(str(path))
            count = reader.num_records()
            reader.close()
        except Exception as e:  # array_record raises plain RuntimeErrors on corrupt files
            raise DataError(f"{path}: unreadable shard ({e})") from None
        if count != documents:
            raise DataError(f"{path}: {count} records, but {manifest_path} says {documents}")


def _decode(record: bytes) -> np.ndarray:
    return np.frombuffer(record, "<u4").astype(np.int32)


def token_shards(manifest: Manifest) -> grain.MapDataset:
    return grain.MapDataset.source(_ShardRecords(manifest.shards, manifest.shard_documents)).map(_decode)


class _ShardRecords:
    """Grain's ArrayRecord source over the shards, in order. A record that cannot
    be read (a shard overwritten, truncated or removed after the run checked it)
    is a DataError naming the shard and the record, not a bare reader error."""

    def __init__(self, shards: tuple[Path, ...], documents: tuple[int, ...]):
        self.shards = [str(p) for p in shards]
        self.ends = np.cumsum(documents)
        self.source = grain.sources.ArrayRecordDataSource(self.shards)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> bytes:
        try:
            return self.source[index]
        except Exception as e:  # array_record raises RuntimeError / OSError with no file name
            shard = int(np.searchsorted(self.ends, index, side="right"))
            first = int(self.ends[shard - 1]) if shard else 0
            raise DataError(f"{self.shards[shard]}: record {index - first} cannot be read "
                            f"({type(e).__name__}: {str(e)[:200]}); the shard changed or disappeared after the run "
                            "started; restore it (or re-run the data_pipelines tokenize step) and resume") from None


class _Tokenize:
    """Picklable text -> token ids (+ EOS) map, for Grain worker processes."""

    def __init__(self, tokenizer_path: str, add_eos: bool):
        self.tokenizer_path, self.add_eos = tokenizer_path, add_eos
        self._tok: Tokenizer | None = None

    def __call__(self, text: str) -> np.ndarray:
        if self._tok is None:
            self._tok = Tokenizer.load(self.tokenizer_path)
        ids = self._tok.encode(text)
        if self.add_eos:
            ids = [*ids, self._tok.eos_id]
        return np.asarray(ids, np.int32)

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_path": self.tokenizer_path, "add_eos": self.add_eos, "_tok": None}


def jsonl_documents(pattern: str, text_field: str, tokenizer_path: str, add_eos: bool) -> grain.MapDataset:
    """Texts of JSONL files (one document per line) or plain text files (one
    document per file), optionally gzipped, tokenized lazily by the pipeline."""
    texts = read_jsonl_texts(pattern, text_field)
    return grain.MapDataset.source(texts).map(_Tokenize(tokenizer_path, add_eos))


def read_jsonl_texts(pattern: str, text_field: str) -> list[str]:
    files = storage.glob(pattern) or [pattern]
    texts: list[str] = []
    for name in files:
        if not storage.isfile(name):
            raise DataError(f"{name}: data file not found (data.path={pattern!r})")
        if ".json" not in name.rsplit("/", 1)[-1]:  # plain text: the whole file is one document
            with _open_text(name) as f:
                texts.append(f.read())
            continue
        for lineno, record in iter_jsonl(name):
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{name}:{lineno}: no string field {text_field!r} (set data.text_field)")
            texts.append(text)
    if not texts:
        raise DataError(f"{pattern}: no documents")
    return texts


@contextlib.contextmanager
def _open_text(path: str | Path) -> Iterator[IO[str]]:
    """A local or gs:// file as text, gunzipped when its name ends in .gz."""
    path = str(path)
    with storage.open_read(path) if storage.is_remote(path) else open(path, "rb") as raw:
        with gzip.open(raw, "rt", encoding="utf-8") if path.endswith(".gz") else io.TextIOWrapper(raw, "utf-8") as f:
            yield f


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for each non-blank line of a .jsonl[.gz] file
    (local or gs://); a line that is not JSON is a DataError naming the file and line."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
