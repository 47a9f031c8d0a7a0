"""Safetensors read/write with numpy + ml_dtypes (bf16 included), streaming and strict.

Reading memory-maps the file and hands out one tensor at a time; a truncated or malformed file (header not an
object of objects, unknown dtype, negative dims, byte ranges that are negative, overlap, leave gaps or do not
match the shape) is an error naming the file and the tensor; these are the checks the `safetensors` library
itself makes. Writing takes the full list of tensor specs first, writes the header, then streams the
tensors in, so peak memory is one tensor regardless of the file size. A tensor that is still the bytes of a
memory-mapped safetensors file (same dtype, unchanged) is copied file to file by the kernel
(`os.copy_file_range`), as `cp` does, instead of through this process's memory; elsewhere it is written.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SafetensorsError(f"key {k!r} appears twice in the header")
        out[k] = v
    return out


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _parse_header(
    path: Path, raw: bytes, data_start: int, data_size: int
) -> tuple[dict[str, str], dict[str, tuple[np.dtype, tuple[int, ...], int, int]]]:
    """Check a safetensors header as the format requires and return (metadata, name -> (dtype, shape, begin,
    end) as absolute file offsets).

    Required: a JSON object of objects; `__metadata__` (optional) maps strings to strings; each tensor has a
    known `dtype`, a `shape` of integers >= 0 and `data_offsets` [begin, end] with 0 <= begin <= end,
    end - begin = prod(shape) x itemsize; the ranges, in order, are disjoint and contiguous from 0 and cover
    the data exactly (no tensor aliases another or the header, no hidden bytes). Errors name the file and
    the tensor.
    """
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except SafetensorsError as e:
        raise SafetensorsError(f"{path}: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise SafetensorsError(f"{where}: entry is a JSON {type(info).__name__}, expected an object with "
                                   "dtype, shape and data_offsets")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise SafetensorsError(f"{where}: missing field(s) {', '.join(missing)}")
        if not isinstance(info["dtype"], str) or info["dtype"] not in _DTYPES:
            raise SafetensorsError(f"{where}: unsupported dtype {info['dtype']!r} (supported: {', '.join(_DTYPES)})")
        dt = _DTYPES[info["dtype"]]
        shape_raw, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape_raw, list) or any(_int(d) is None or d < 0 for d in shape_raw):
            raise SafetensorsError(f"{where}: shape {shape_raw!r} is not a list of integers >= 0")
        shape = tuple(shape_raw)
        if not isinstance(offsets, list) or len(offsets) != 2 or any(_int(x) is None for x in offsets):
            raise SafetensorsError(f"{where}: data_offsets {offsets!r} is not a pair of integers [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise SafetensorsError(f"{where}: data_offsets {offsets!r} must satisfy 0 <= begin <= end")
        nbytes = int(np.prod(shape, dtype=object) if shape else 1) * dt.itemsize
        if end - begin != nbytes:
            raise SafetensorsError(f"{where}: byte range {offsets!r} holds {end - begin} bytes, but shape {shape} of "
                                   f"{info['dtype']} needs {nbytes}")
        if end > data_size:
            raise SafetensorsError(f"{path}: truncated: tensor {name!r} needs bytes up to {data_start + end}, file "
                                   f"has {data_start + data_size}")
        ranges.append((begin, end, name))
        entries[name] = (dt, shape, data_start + begin, data_start + end)
    ranges.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:  # sorted by begin: any overlap shows between neighbours (zero-size tensors share no bytes)
            raise SafetensorsError(f"{path}: tensor {n1!r}: data_offsets [{b1}, {e1}] overlaps tensor {n0!r} "
                                   f"[{b0}, {e0}]; tensor byte ranges must be disjoint")
    expected = 0
    for begin, end, name in ranges:
        if begin != expected:
            raise SafetensorsError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] leave a gap (bytes "
                                   f"{expected}..{begin} belong to no tensor); tensor byte ranges must be contiguous")
        expected = end
    if expected != data_size:
        raise SafetensorsError(f"{path}: tensors cover {expected} data bytes but the file holds {data_size} after "
                               "the header")
    return metadata, entries


@dataclass(frozen=True)
class _Mapping:
    """Where one open SafetensorsFile's bytes are mapped, and which file (device, inode) they are."""
    start: int
    size: int
    path: Path
    dev: int
    ino: int


_MAPPINGS: dict[int, _Mapping] = {}  # id(SafetensorsFile) -> its mapping, while the object lives
# errors of copy_file_range that mean "not here" (another filesystem on old kernels, unsupported file types):
# the tensor is then written the ordinary way
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def _file_range(arr: np.ndarray) -> tuple[_Mapping, int] | None:
    """(mapping, byte offset in its file) when `arr` is a contiguous run of bytes of a mapped safetensors file."""
    if not arr.flags.c_contiguous or arr.nbytes == 0:
        return None
    addr = arr.__array_interface__["data"][0]
    for m in list(_MAPPINGS.values()):
        if m.start <= addr and addr + arr.nbytes <= m.start + m.size:
            return m, addr - m.start
    return None


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
            raw = self._file.read(n)
            data_size = size - 8 - n
            self.metadata, self._entries = _parse_header(self.path, raw, 8 + n, data_size)
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            self._file.close()
            raise
        if self._mmap is not None:
            st = os.fstat(self._file.fileno())
            start = np.frombuffer(self._mmap, np.uint8).__array_interface__["data"][0]
            _MAPPINGS[id(self)] = _Mapping(start, size, self.path.resolve(), st.st_dev, st.st_ino)
            weakref.finalize(self, _MAPPINGS.pop, id(self), None)

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
    sources: dict[_Mapping, int | None] = {}  # open read fds of the mapped files tensors are copied from
    try:
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
                arr = np.ascontiguousarray(arr, dtype=s.dtype)
                if not _kernel_copy(f, arr, sources):
                    f.write(arr.reshape(-1).view(np.uint8).data)
    finally:
        for fd in sources.values():
            if fd is not None:
                os.close(fd)


def _source_fd(m: _Mapping, sources: dict[_Mapping, int | None]) -> int | None:
    """A read fd of the mapped file, or None when the path now names another file (replaced since mapped)."""
    if m not in sources:
        try:
            fd = os.open(m.path, os.O_RDONLY)
        except OSError:
            fd = None
        if fd is not None:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (m.dev, m.ino):
                os.close(fd)
                fd = None
        sources[m] = fd
    return sources[m]


def _kernel_copy(f: Any, arr: np.ndarray, sources: dict[_Mapping, int | None]) -> bool:
    """Append `arr` to the open file `f` with os.copy_file_range when it is unchanged bytes of a mapped
    safetensors file; False (nothing written) when it is not, or the kernel cannot copy between these files."""
    found = _file_range(arr) if hasattr(os, "copy_file_range") else None
    if found is None:
        return False
    m, offset = found
    fd = _source_fd(m, sources)
    if fd is None:
        return False
    f.flush()
    pos, done, total = f.tell(), 0, arr.nbytes
    try:
        while done < total:
            n = os.copy_file_range(fd, f.fileno(), total - done, offset + done, pos + done)
            if n == 0:
                raise SafetensorsError(f"{m.path}: ended while copying {total} bytes at offset {offset}")
            done += n
    except OSError as e:
        if done == 0 and e.errno in _NO_KERNEL_COPY:
            sources[m] = None  # don't try this file again
            os.close(fd)
            return False
        raise
    f.seek(pos + total)
    return True


def iter_tensors(files: Iterable[str | os.PathLike]) -> Iterator[tuple[str, np.ndarray, Path]]:
    """Every tensor of every file, one at a time, with the file it came from."""
    for path in files:
        with SafetensorsFile(path) as f:
            for name in f.keys():
                yield name, f.get(name), f.path
