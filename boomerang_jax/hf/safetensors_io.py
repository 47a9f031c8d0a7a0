"""Safetensors read/write with numpy + ml_dtypes (bf16 included), streaming and strict.

Reading memory-maps the file and hands out one tensor at a time; a truncated or malformed file is an error
naming the file. Writing takes the full list of tensor specs first, writes the header, then streams the
tensors in, so peak memory is one tensor regardless of the file size.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that is malformed, truncated or holds an unsupported dtype."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def dtype_name(dtype: np.dtype) -> str:
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise SafetensorsError(f"dtype {dtype} cannot be stored in safetensors") from None


class SafetensorsFile:
    """A memory-mapped safetensors file: `specs()` lists tensors, `get(name)` returns a read-only view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size < 8:
                raise SafetensorsError(f"{self.path}: truncated (only {size} bytes)")
            (n,) = struct.unpack("<Q", self._file.read(8))
            if n > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(f"{self.path}: truncated or not safetensors (header length {n}, file {size} bytes)")
            try:
                header = json.loads(self._file.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
            self.metadata: dict = header.pop("__metadata__", None) or {}
            self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
            data_start = 8 + n
            for name, info in header.items():
                try:
                    dt = _DTYPES[info["dtype"]]
                    shape = tuple(int(d) for d in info["shape"])
                    begin, end = (int(x) for x in info["data_offsets"])
                except KeyError as e:
                    raise SafetensorsError(f"{self.path}: tensor {name!r}: unsupported or missing field {e}") from None
                if end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                    raise SafetensorsError(f"{self.path}: tensor {name!r}: byte range does not match shape {shape}")
                if data_start + end > size:
                    raise SafetensorsError(
                        f"{self.path}: truncated: tensor {name!r} needs bytes up to {data_start + end}, file has {size}"
                    )
                self._entries[name] = (dt, shape, data_start + begin, data_start + end)
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            self._file.close()
            raise

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(k, v[1], v[0]) for k, v in self._entries.items()]

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        dt, shape, begin, end = self._entries[name]
        return np.frombuffer(self._mmap, dtype=dt, count=(end - begin) // dt.itemsize, offset=begin).reshape(shape)

    def close(self) -> None:
        # Views handed out keep the mapping alive; closing the file object is always safe.
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(
    path: str | os.PathLike,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `tensors` (yielded in the order of `specs`, each matching its spec) to one safetensors file."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": dtype_name(s.dtype), "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    it = iter(tensors)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            try:
                name, arr = next(it)
            except StopIteration:
                raise SafetensorsError(f"{path}: tensor stream ended before {s.name!r}") from None
            arr = np.asarray(arr)
            if name != s.name or tuple(arr.shape) != s.shape:
                raise SafetensorsError(
                    f"{path}: expected tensor {s.name!r} {s.shape}, got {name!r} {tuple(arr.shape)}"
                )
            f.write(np.ascontiguousarray(arr, dtype=s.dtype).reshape(-1).view(np.uint8).data)


def iter_tensors(files: Iterable[str | os.PathLike]) -> Iterator[tuple[str, np.ndarray, Path]]:
    """Every tensor of every file, one at a time, with the file it came from."""
    for path in files:
        with SafetensorsFile(path) as f:
            for name in f.keys():
                yield name, f.get(name), f.path
