"""Readers: JSONL (plain, .gz, .zst), Parquet, text files or directories of them,
and WARC with HTML-to-text extraction (trafilatura); local paths or gs://.

A reader yields `(position, Document | BadRecord)`. Bad input never raises: a
malformed JSON line, invalid UTF-8, a missing or empty text field, a document over
`max_doc_chars`, or a file that cannot be read becomes a `BadRecord` with a reason
(`read/<rule>`) and the file and line it came from. The position (index of the
record in its file) is what splits a file into parts and orders documents
globally, so it never depends on how work is divided.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from data_pipelines import io as dio
from data_pipelines.config import InputConfig
from data_pipelines.document import Document


@dataclass
class BadRecord:
    reason: str  # read/<rule>
    file: str
    line: int  # 1-based line or record number; 0 for a file-level error
    detail: str
    raw: str = ""  # the start of the offending input, for the rejects file

    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


Record = tuple[int, Document | BadRecord]


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix in (".gz", ".zst", ".zstd"):
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".warc", ".arc")):
        return "warc"
    return "text"


def read_file(path: str, cfg: InputConfig) -> Iterator[Record]:
    """Every record of one input file (or directory of text files), in order."""
    fmt = detect_format(path, cfg.format)
    reader = {"jsonl": _jsonl, "parquet": _parquet, "warc": _warc, "text": _text}[fmt]
    position = 0
    try:
        for position, record in enumerate(reader(path, cfg)):
            if isinstance(record, Document) and len(record.text) > cfg.max_doc_chars:
                record = BadRecord("read/too_large", path, position + 1,
                                   f"{len(record.text)} characters > input.max_doc_chars={cfg.max_doc_chars}",
                                   record.text[:200])
            yield position, record
    except Exception as e:  # a truncated archive, a permission error, a broken Parquet file
        yield position + 1, BadRecord("read/unreadable_file", path, position + 1,
                                      f"{type(e).__name__}: {e}", "")


def _open_decompressed(path: str) -> IO[bytes]:
    raw = dio.open_read(path)
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if lower.endswith((".zst", ".zstd")):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def _jsonl(path: str, cfg: InputConfig) -> Iterator[Document | BadRecord]:
    with _open_decompressed(path) as f:
        for lineno, raw in enumerate(f, 1):
            yield _parse_json_line(raw, path, lineno, cfg)


def _parse_json_line(raw: bytes, path: str, lineno: int, cfg: InputConfig) -> Document | BadRecord:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord("read/invalid_utf8", path, lineno, str(e), raw[:200].decode("utf-8", "replace"))
    if not line.strip():
        return BadRecord("read/blank_line", path, lineno, "blank line")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRecord("read/invalid_json", path, lineno, e.msg, line[:200])
    if not isinstance(record, dict):
        return BadRecord("read/invalid_json", path, lineno, "not a JSON object", line[:200])
    return _document(record, path, lineno, cfg, line[:200])


def _document(record: dict[str, Any], path: str, lineno: int, cfg: InputConfig, raw: str) -> Document | BadRecord:
    text = record.pop(cfg.text_field, None)
    if text is None:
        return BadRecord("read/missing_text", path, lineno, f"no field {cfg.text_field!r}", raw)
    if not isinstance(text, str):
        return BadRecord("read/missing_text", path, lineno, f"{cfg.text_field!r} is not a string", raw)
    if not text.strip():
        return BadRecord("read/empty_text", path, lineno, f"{cfg.text_field!r} is empty", raw)
    doc_id = record.pop(cfg.id_field, None)
    doc_id = str(doc_id) if doc_id is not None else f"{os.path.basename(path)}:{lineno}"
    return Document(doc_id, text, record)


def _parquet(path: str, cfg: InputConfig) -> Iterator[Document | BadRecord]:
    import pyarrow.parquet as pq

    with dio.open_read(path) as f:
        table = pq.ParquetFile(f)
        row = 0
        for batch in table.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield _document(record, path, row, cfg, "")


def _text(path: str, cfg: InputConfig) -> Iterator[Document | BadRecord]:
    fs, root = dio.fs_and_path(path)
    files = sorted(fs.find(root)) if fs.isdir(root) else [root]
    for lineno, name in enumerate(files, 1):
        with fs.open(name, "rb") as f:
            raw = f.read()
        doc_id = os.path.relpath(name, root) if name != root else os.path.basename(name)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield BadRecord("read/invalid_utf8", name, 0, str(e), raw[:200].decode("utf-8", "replace"))
            continue
        if not text.strip():
            yield BadRecord("read/empty_text", name, 0, "empty file")
            continue
        yield Document(doc_id, text, {"path": name})


def _warc(path: str, cfg: InputConfig) -> Iterator[Document | BadRecord]:
    """HTML responses of a WARC file, as text extracted by trafilatura."""
    import trafilatura
    from warcio.archiveiterator import ArchiveIterator

    with dio.open_read(path) as f:
        for number, record in enumerate(ArchiveIterator(f), 1):
            if record.rec_type != "response":
                continue
            headers = record.http_headers
            if headers is None or "html" not in (headers.get_header("Content-Type") or ""):
                continue
            url = record.rec_headers.get_header("WARC-Target-URI")
            record_id = record.rec_headers.get_header("WARC-Record-ID") or f"{os.path.basename(path)}:{number}"
            html = record.content_stream().read()
            text = trafilatura.extract(html, url=url, include_comments=False, include_tables=True)
            if not text or not text.strip():
                yield BadRecord("read/no_text_extracted", path, number, f"no text in {url}")
                continue
            yield Document(record_id.strip("<>"), text, {"url": url, "date": record.rec_headers.get_header("WARC-Date")})
