"""The few file operations maxllm does itself, on local paths and gs:// URLs.

Built on `data_pipelines.io` (fsspec; gs:// through gcsfs, from `maxllm[gcs]`).
Checkpoints are not here: Orbax reads and writes gs:// itself (tensorstore). An
object store differs from a disk in three ways that matter here:

- no rename: a local file is written under a temporary name and renamed when
  complete; a gs:// object is written in place, as it appears only once its
  upload completes (`write_text`, `atomic_write`);
- no append: `ObjectLog` keeps what was appended and rewrites the whole object,
  at most every `SYNC_SECONDS` and on close (metrics.jsonl, TensorBoard events);
- readers that need local files (ArrayRecord shards through Grain, sentencepiece,
  safetensors) read `local_copy(url)`: the file or folder mirrored into the cache
  (`$MAXLLM_CACHE_DIR`, default ~/.cache/maxllm), fetched again only where a
  file's size or modification time differs, as rsync's quick check does.
"""

from __future__ import annotations

import glob as _glob
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import IO

from data_pipelines.io import (
    atomic_write,
    exists,
    fs_and_path,
    is_remote,
    join,
    listdir,
    open_read,
    read_text,
    remove,
    write_text,
)
from maxllm.config import ConfigError

__all__ = [
    "ObjectLog", "StorageError", "atomic_write", "check_bucket", "exists", "glob", "is_remote", "isdir", "isfile",
    "join", "listdir", "local_copy", "makedirs", "open_log", "open_read", "read_text", "remove", "upload_dir",
    "write_text",
]

log = logging.getLogger(__name__)

SYNC_SECONDS = 5.0  # GCS allows about one update per second of one object


class StorageError(ConfigError):
    """A path that cannot be used: a bucket that does not exist, nothing at a URL."""


def isdir(path: str) -> bool:
    fs, p = fs_and_path(path)
    return fs.isdir(p)


def isfile(path: str) -> bool:
    fs, p = fs_and_path(path)
    return fs.isfile(p)


def glob(pattern: str) -> list[str]:
    """The paths (URLs for a URL) matching `pattern`, sorted."""
    if not is_remote(pattern):
        return sorted(_glob.glob(pattern))
    fs, p = fs_and_path(pattern)
    protocol = pattern.split("://")[0]
    return [f"{protocol}://{match}" for match in sorted(fs.glob(p))]


def check_bucket(url: str) -> None:
    """Raises StorageError naming `url` when its bucket cannot be seen."""
    fs, p = fs_and_path(url)
    bucket = p.split("/")[0]
    if not fs.exists(bucket):
        raise StorageError(f"{url}: bucket {url.split('://')[0]}://{bucket} does not exist, "
                           "or these credentials cannot see it")


def makedirs(path: str) -> None:
    """A local directory and its parents; for a URL, a check that its bucket exists
    (an object store has no directories to make)."""
    if is_remote(path):
        check_bucket(path)
    else:
        os.makedirs(path, exist_ok=True)


def cache_dir() -> Path:
    return Path(os.environ.get("MAXLLM_CACHE_DIR") or Path.home() / ".cache" / "maxllm")


def local_copy(url: str) -> Path:
    """The local mirror of the file or folder at `url`; see the module docstring.
    Safe for several processes of one host at once (each file lands by rename)."""
    fs, root = fs_and_path(url)
    root = root.rstrip("/")
    files = fs.find(root, detail=True)
    if not files:
        check_bucket(url)
        raise StorageError(f"{url}: no such file or folder")
    target = cache_dir() / url.split("://")[0] / root
    fetched = 0
    for name, info in sorted(files.items()):
        local = target / name[len(root):].lstrip("/") if name != root else target
        mtime = int(info["mtime"].timestamp())
        if local.is_file() and local.stat().st_size == info["size"] and int(local.stat().st_mtime) == mtime:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex[:8]}")
        fs.get_file(name, str(partial))
        os.utime(partial, (mtime, mtime))
        os.replace(partial, local)
        fetched += info["size"]
    if fetched:
        log.info("copied %s to %s (%.1f MB fetched)", url, target, fetched / 1e6)
    return target


def upload_dir(folder: Path, url: str, last: str | None = None) -> None:
    """Uploads the files under `folder` to `url`; the file named `last` goes last, so
    that a reader who looks for it finds the folder complete."""
    fs, root = fs_and_path(url)
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
    for path in files:
        fs.put_file(str(path), f"{root.rstrip('/')}/{path.relative_to(folder).as_posix()}")


class ObjectLog:
    """Data appended to a gs:// object, which cannot be appended to: the data is kept
    and the object rewritten whole by `flush`, at most every `SYNC_SECONDS`, and by
    `close`. A killed process loses what it wrote in its last few seconds. A failed
    upload is a warning, retried at the next flush (the run goes on); at `close`, an
    error."""

    def __init__(self, url: str, data: str | bytes = b""):
        self.url = url
        self._parts = [_bytes(data)]
        self._dirty = True
        self._saved_at: float | None = None
        self._lock = threading.Lock()  # tensorboardX flushes from its own thread too

    def write(self, data: str | bytes) -> None:
        self._parts.append(_bytes(data))
        self._dirty = True

    def flush(self, force: bool = False) -> None:
        with self._lock:
            recent = self._saved_at is not None and time.monotonic() - self._saved_at < SYNC_SECONDS
            if not self._dirty or (recent and not force):
                return
            self._dirty = False  # before the snapshot: a write during the upload sets it again
            try:
                with atomic_write(self.url) as f:
                    f.write(b"".join(self._parts))
            except Exception as e:
                self._dirty = True
                if force:
                    raise
                log.warning("%s: upload failed, retried at the next flush (%s: %s)", self.url, type(e).__name__, e)
            self._saved_at = time.monotonic()

    def close(self) -> None:
        self.flush(force=True)


def _bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


def open_log(path: str, text: str | None = None) -> IO[str] | ObjectLog:
    """A text log to append to, starting as `text` (None: as it is now)."""
    if is_remote(path):
        if text is None:
            text = read_text(path) if exists(path) else ""
        return ObjectLog(path, text)
    if text is not None:
        write_text(path, text)
    return open(path, "a")
