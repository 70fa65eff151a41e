"""Files on local disk or any fsspec filesystem (gs:// through gcsfs), with atomic
writes: everything is written under a temporary name and renamed when complete, so
a crashed task never leaves a file that passes for a finished one."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec


def fs_and_path(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(path)


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def expand(patterns: list[str]) -> list[str]:
    """Files matching the globs, sorted and deduplicated; directories are kept as is
    (the text reader walks them). A pattern matching nothing is an error naming it."""
    out: list[str] = []
    for pattern in patterns:
        fs, path = fs_and_path(pattern)
        matches = sorted(fs.glob(path)) if any(c in path for c in "*?[") else ([path] if fs.exists(path) else [])
        if not matches:
            raise FileNotFoundError(f"input.paths: {pattern!r} matches no file")
        proto = pattern.split("://")[0] + "://" if is_remote(pattern) else ""
        out.extend(proto + m if proto and not m.startswith(proto) else m for m in matches)
    return sorted(dict.fromkeys(out))


def exists(path: str) -> bool:
    fs, p = fs_and_path(path)
    return fs.exists(p)


def makedirs(path: str) -> None:
    fs, p = fs_and_path(path)
    fs.makedirs(p, exist_ok=True)


def listdir(path: str) -> list[str]:
    fs, p = fs_and_path(path)
    if not fs.exists(p):
        return []
    return sorted(os.path.basename(x.rstrip("/")) for x in fs.ls(p, detail=False))


def remove(path: str) -> None:
    fs, p = fs_and_path(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def open_read(path: str) -> IO[bytes]:
    fs, p = fs_and_path(path)
    return fs.open(p, "rb")


def read_text(path: str) -> str:
    with open_read(path) as f:
        return f.read().decode()


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[IO[bytes]]:
    """A binary file at a temporary name, renamed to `path` only if the block ends
    without an exception. Object stores (gs://) need no rename: an object becomes
    visible only when its upload completes, so it is written in place."""
    fs, p = fs_and_path(path)
    if is_remote(path):
        f = fs.open(p, "wb")
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # cancel the upload: nothing appears under `path`
            raise
        f.close()
        return
    fs.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text.encode())


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


class JsonlGzWriter:
    """Documents as gzipped JSON lines, committed atomically on close."""

    def __init__(self, path: str):
        self._cm = atomic_write(path)
        self._raw = self._cm.__enter__()
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=3, mtime=0)
        self._text = io.TextIOWrapper(self._gz, encoding="utf-8")
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        self._text.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self, ok: bool = True) -> None:
        self._text.flush()
        self._gz.close()
        if ok:
            self._cm.__exit__(None, None, None)
        else:
            self._cm.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> "JsonlGzWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def read_jsonl_gz(path: str) -> Iterator[dict[str, Any]]:
    with open_read(path) as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
