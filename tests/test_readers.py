"""Readers: every format yields the same documents; bad input becomes a counted,
located BadRecord, never an exception."""

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.config import InputConfig
from data_pipelines.document import Document
from data_pipelines.readers import BadRecord, read_file

DOCS = [
    {"id": "a", "text": "First document.\nWith two lines.", "url": "https://a.example/1"},
    {"id": "b", "text": "Second document, about PostgreSQL.", "url": "https://b.example/2"},
]


def _read(path, **kw):
    return [record for _, record in read_file(str(path), InputConfig(paths=[str(path)], **kw))]


def _check(records):
    assert [(d.id, d.text, d.metadata.get("url")) for d in records] == [(d["id"], d["text"], d["url"]) for d in DOCS]


def test_jsonl_plain_gz_and_zst(tmp_path):
    import zstandard

    lines = "".join(json.dumps(d) + "\n" for d in DOCS).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst"):
        _check(_read(tmp_path / name))


def test_parquet_with_other_field_names(tmp_path):
    table = pa.Table.from_pylist([{"doc_id": d["id"], "content": d["text"], "url": d["url"]} for d in DOCS])
    pq.write_table(table, tmp_path / "a.parquet")
    _check(_read(tmp_path / "a.parquet", text_field="content", id_field="doc_id"))


def test_directory_of_text_files(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "one.txt").write_text("one text")
    (tmp_path / "docs" / "sub" / "two.txt").write_text("two text")
    records = _read(tmp_path / "docs")
    assert [(d.id, d.text) for d in records] == [("one.txt", "one text"), ("sub/two.txt", "two text")]


def test_warc_html_is_extracted(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    html = (
        "<html><head><title>T</title></head><body><nav>Home | About</nav><article><h1>Packing rows</h1>"
        + "".join(f"<p>Paragraph {i} explains how documents are packed into rows of tokens for training.</p>" for i in range(6))
        + "</article><footer>Copyright</footer></body></html>"
    ).encode()
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
    writer.write_record(writer.create_warc_record("https://blog.example/packing", "response",
                                                  payload=io.BytesIO(html), http_headers=headers))
    (tmp_path / "crawl.warc.gz").write_bytes(buf.getvalue())
    (doc,) = _read(tmp_path / "crawl.warc.gz")
    assert isinstance(doc, Document)
    assert "Paragraph 3 explains how documents are packed" in doc.text
    assert "Home | About" not in doc.text
    assert doc.metadata["url"] == "https://blog.example/packing"


def test_bad_input_is_counted_and_located(tmp_path):
    good = json.dumps(DOCS[0]).encode()
    lines = [
        good,
        b'{"id": "x", "text": "unterminated',
        b'{"id": "y", "text": "caf\xe9 latin-1 bytes"}',
        json.dumps({"id": "z"}).encode(),
        json.dumps({"id": "e", "text": "   "}).encode(),
        json.dumps({"id": "big", "text": "x" * 10_000_000}).encode(),  # a 10 MB document
        b"[1, 2, 3]",
        good,
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records = _read(path)
    reasons = [r.reason if isinstance(r, BadRecord) else "ok" for r in records]
    assert reasons == ["ok", "read/invalid_json", "read/invalid_utf8", "read/missing_text",
                       "read/empty_text", "read/too_large", "read/invalid_json", "ok"]
    assert [r.where() for r in records if isinstance(r, BadRecord)][:2] == [f"{path}:2", f"{path}:3"]


def test_truncated_gzip_keeps_what_was_read_and_names_the_file(tmp_path):
    data = gzip.compress("".join(json.dumps({"id": str(i), "text": f"document {i} " * 50}) + "\n" for i in range(200)).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    records = _read(path)
    assert all(isinstance(r, Document) for r in records[:-1]) and len(records) > 10
    assert isinstance(records[-1], BadRecord) and records[-1].reason == "read/unreadable_file"
    assert str(path) in records[-1].where() and "EOFError" in records[-1].detail


def test_missing_input_names_the_pattern(tmp_path):
    from data_pipelines.io import expand

    with pytest.raises(FileNotFoundError, match=r"input.paths: '.*nothing-\*.jsonl' matches no file"):
        expand([str(tmp_path / "nothing-*.jsonl")])
