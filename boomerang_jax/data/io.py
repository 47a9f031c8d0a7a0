"""Every file operation of the data pipeline, in one place: local paths now, `gs://` through etils.epath.

Reading ArrayRecord shards needs no help (array_record opens `gs://` itself); writing them does not work
on `gs://` (ArrayRecordWriter fails there), so writers use `staged_dir`: write locally, then upload.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for URLs such as gs://bucket/dir; False for local paths."""
    return "://" in str(path)


def _epath(path: PathLike):
    from etils import epath

    return epath.Path(str(path))


def join(base: PathLike, *parts: str) -> str:
    """Join path components, keeping the `gs://` scheme intact."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base).joinpath(*parts))


def name(path: PathLike) -> str:
    """The last path component."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def exists(path: PathLike) -> bool:
    return _epath(path).exists() if is_remote(path) else Path(path).exists()


def is_dir(path: PathLike) -> bool:
    return _epath(path).is_dir() if is_remote(path) else Path(path).is_dir()


def has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def glob(pattern: PathLike) -> list[str]:
    """Sorted matches of a glob pattern (`**` recursive for local paths)."""
    pattern = str(pattern)
    if not is_remote(pattern):
        return sorted(_glob.glob(pattern, recursive=True))
    # Remote: glob relative to the longest prefix without wildcards.
    parts = pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if has_glob(p))
    base = _epath("/".join(parts[:fixed]))
    return sorted(str(p) for p in base.glob("/".join(parts[fixed:])))


def walk_files(directory: PathLike) -> list[str]:
    """Every file below a directory, recursively, sorted."""
    if is_remote(directory):
        return sorted(str(p) for p in _epath(directory).rglob("*") if p.is_file())
    return sorted(str(p) for p in Path(directory).rglob("*") if p.is_file())


def open_binary(path: PathLike) -> IO[bytes]:
    """Open a file for reading bytes."""
    return _epath(path).open("rb") if is_remote(path) else open(path, "rb")


def read_text(path: PathLike) -> str:
    return _epath(path).read_text() if is_remote(path) else Path(path).read_text(encoding="utf-8")


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write a small text file so that readers never see half of it (local: rename; gs://: one upload)."""
    if is_remote(path):
        _epath(path).write_text(text)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def makedirs(path: PathLike) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        Path(path).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike) -> None:
    """Delete a file if it exists."""
    if is_remote(path):
        p = _epath(path)
        if p.exists():
            p.unlink()
    else:
        Path(path).unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(out_dir: PathLike) -> Iterator[str]:
    """A local directory to write into; for a remote `out_dir`, uploaded there when the block exits cleanly."""
    if not is_remote(out_dir):
        makedirs(out_dir)
        yield str(out_dir)
        return
    local = tempfile.mkdtemp(prefix="boomerang-stage-")
    try:
        yield local
        makedirs(out_dir)
        for f in sorted(Path(local).rglob("*")):
            if f.is_file():
                dst = _epath(join(out_dir, *f.relative_to(local).parts))
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open(f, "rb") as src, dst.open("wb") as out:
                    shutil.copyfileobj(src, out, length=16 << 20)
    finally:
        shutil.rmtree(local, ignore_errors=True)
