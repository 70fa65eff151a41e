"""The safetensors format, written one tensor at a time and read lazily.

A file is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, byte range; `__metadata__`), then the tensors' bytes back to back. Every
shape is known before any data is, so the header goes first and each tensor is
produced, written and dropped in turn: peak host memory stays near the largest
tensor, not the whole model. Files are written under a temporary name and
renamed when complete, so a cut-short export never leaves a valid-looking file.
The same inputs give the same bytes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from maxllm.hf.adapters import HFError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


def dtype_code(dtype) -> str:
    return CODES[np.dtype(dtype)]


def write_file(
    path: Path,
    entries: list[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes `entries` (name, shape, dtype) in order; `produce(name)` gives each
    tensor's data when its turn comes."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dtype in entries:
            array = np.ascontiguousarray(produce(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise HFError(f"{name}: produced shape {array.shape}, expected {tuple(shape)}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_size(text: str) -> int:
    """'5GB' (10^9), '500MiB' (2^20), or a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 2GiB")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(float(m.group(1)) * base**power)


def plan_shards(entries: list[tuple[str, tuple[int, ...], np.dtype]], max_bytes: int) -> list[list[int]]:
    """Consecutive groups of entries, each at most `max_bytes` (a larger tensor alone)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(entries):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    return groups


class SafetensorsFolder:
    """The tensors of `model.safetensors` or of the shards an index names,
    memory-mapped and read one at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise HFError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [single.name]
        else:
            raise HFError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.where: dict[str, tuple[Path, dict]] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise HFError(f"{path}: shard named by {index.name} is missing")
            for tensor, info in _read_header(path).items():
                self.where[tensor] = (path, info)

    def names(self) -> Iterable[str]:
        return self.where.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[1]["shape"])

    def _info(self, name: str) -> tuple[Path, dict]:
        if name not in self.where:
            raise HFError(f"{self.folder}: tensor {name!r} not found")
        return self.where[name]

    def get(self, name: str) -> np.ndarray:
        path, info = self._info(name)
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._maps[path]
        start, stop = info["data_offsets"]
        base = 8 + int.from_bytes(buf[:8], "little")
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise HFError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        count = (stop - start) // dtype.itemsize
        return np.frombuffer(buf, dtype, count, base + start).reshape(info["shape"])

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


def _read_header(path: Path) -> dict[str, dict]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HFError(f"{path}: truncated safetensors file")
        size = int.from_bytes(head, "little")
        if 8 + size > path.stat().st_size:
            raise HFError(f"{path}: truncated safetensors file (header of {size} bytes, file of {path.stat().st_size})")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HFError(f"{path}: bad safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = 8 + size + max((info["data_offsets"][1] for info in header.values()), default=0)
    if path.stat().st_size < end:
        raise HFError(f"{path}: truncated ({path.stat().st_size} bytes, header needs {end})")
    return header
