"""One path abstraction for the whole project: local paths and `gs://` URLs (any fsspec URL, via gcsfs).

Every module that reads or writes files (HF import/export, family export, prepared data, training runs)
goes through these functions, so the difference between a local disk and a bucket lives here only:

- Local paths use pathlib/os; URLs (`gs://bucket/dir`) use fsspec (gcsfs) with listing caches off, so a
  listing always sees what other writers (orbax/tensorstore, other hosts) just wrote.
- "Looks complete" is made explicit. A directory export is assembled locally and published with
  `infra.publish.publish_dir`: locally by renaming a hidden sibling into place (atomic); on a bucket, where there is no
  directory rename, by uploading every object first and its *marker* (`config.json`, `family.json`) last,
  after deleting the previous marker. Readers require the marker, so a crash mid-export never leaves an
  object set that looks complete.
- Reading a remote model directory (`local_copy`) downloads it once into a cache
  (`$BOOMERANG_CACHE`, default `~/.cache/boomerang`), reused while the remote objects are unchanged.

Clients and their endpoint settings (for a GCS emulator): gcsfs and google-cloud-storage read
`STORAGE_EMULATOR_HOST`; tensorstore (orbax) reads `TENSORSTORE_GCS_HTTP_URL`; array_record's reader reads
`CLOUD_STORAGE_EMULATOR_ENDPOINT` (see docs/GCS.md).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob as _glob
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Iterable, Sequence

PathLike = str | os.PathLike
CACHE_ENV = "BOOMERANG_CACHE"
STAGING_ENV = "BOOMERANG_STAGING_DIR"  # local disk for assembling remote exports (default: the temp dir)
_MANIFEST = ".boomerang-source.json"  # inside a cached local copy: which remote objects it mirrors


class StorageError(OSError):
    """A storage operation that cannot be done as asked; the message names the path."""


class UnsafePathError(ValueError):
    """A file name read from a listing, an index or a manifest that would leave its directory."""


def check_relative(rel: str, *, where: str, what: str = "file name") -> str:
    """`rel` if it is a plain relative path that stays inside its directory, else an UnsafePathError naming
    `where` (the index, manifest or listing it came from) and the value.

    Refused: non-strings, empty names, absolute paths (`/x`, `C:x`, `\\x`), `..` components, backslashes
    and NUL bytes.
    """
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(f"{where}: {what} {rel!r} is not a non-empty string")
    parts = rel.split("/")
    if (rel.startswith("/") or "\\" in rel or "\0" in rel or (len(rel) > 1 and rel[1] == ":")
            or any(p in ("", ".", "..") for p in parts)):
        raise UnsafePathError(f"{where}: {what} {rel!r} leaves its directory (only plain relative names such as "
                              "'model-00001-of-00002.safetensors' are allowed)")
    return rel


# ------------------------------------------------------------------------------------------- paths
def is_remote(path: PathLike) -> bool:
    """True for URLs such as gs://bucket/dir; False for local paths."""
    return "://" in str(path)


def join(base: PathLike, *parts: str) -> str:
    """Join path components, keeping a URL scheme intact."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base).joinpath(*parts))


def name(path: PathLike) -> str:
    """The last path component."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path: PathLike) -> str:
    """The directory holding `path`."""
    if is_remote(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return str(Path(path).parent)


def split_url(url: str) -> tuple[str, str, str]:
    """'gs://bucket/a/b' -> ('gs', 'bucket', 'a/b')."""
    scheme, _, rest = str(url).partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{url}: no bucket in URL")
    return scheme, bucket, key.strip("/")


@functools.lru_cache(maxsize=None)
def _filesystem(protocol: str) -> Any:
    import fsspec

    # No listing cache: tensorstore, other hosts and other processes write behind gcsfs's back.
    return fsspec.filesystem(protocol, use_listings_cache=False)


def _fs(url: PathLike) -> Any:
    return _filesystem(str(url).split("://", 1)[0])


def _url(url: PathLike, listed: str) -> str:
    """fsspec lists 'bucket/key'; put the scheme back."""
    scheme = str(url).split("://", 1)[0]
    return listed if "://" in listed else f"{scheme}://{listed}"


# ------------------------------------------------------------------------------------------ queries
def exists(path: PathLike) -> bool:
    return _fs(path).exists(str(path)) if is_remote(path) else Path(path).exists()


def is_dir(path: PathLike) -> bool:
    """A local directory, or a URL prefix with objects below it."""
    return _fs(path).isdir(str(path)) if is_remote(path) else Path(path).is_dir()


def is_file(path: PathLike) -> bool:
    return _fs(path).isfile(str(path)) if is_remote(path) else Path(path).is_file()


def listdir(path: PathLike) -> list[str]:
    """Names of the direct children of a directory (empty if it does not exist), sorted."""
    if not is_remote(path):
        p = Path(path)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    try:
        return sorted(name(p) for p in _fs(path).ls(str(path), detail=False) if name(p))
    except FileNotFoundError:
        return []


def has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def glob(pattern: PathLike) -> list[str]:
    """Sorted matches of a glob pattern (`**` recursive)."""
    pattern = str(pattern)
    if not is_remote(pattern):
        return sorted(_glob.glob(pattern, recursive=True))
    return sorted(_url(pattern, p) for p in _fs(pattern).glob(pattern))


def list_files(directory: PathLike) -> dict[str, dict[str, Any]]:
    """Every file below a directory, recursively: relative path -> {'size', 'version'} (sorted)."""
    if not is_remote(directory):
        root = Path(directory)
        if not root.is_dir():
            return {}
        out = {}
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                out[p.relative_to(root).as_posix()] = {"size": st.st_size, "version": str(st.st_mtime_ns)}
        return out
    base = str(directory).rstrip("/")
    try:
        found = _fs(base).find(base, detail=True)
    except FileNotFoundError:
        return {}
    prefix = base.split("://", 1)[1] + "/"
    out = {}
    for path, info in sorted(found.items()):
        if info.get("type") == "directory" or not path.startswith(prefix):
            continue
        version = info.get("generation") or info.get("etag") or info.get("md5Hash") or info.get("crc32c") or ""
        out[path[len(prefix):]] = {"size": int(info.get("size") or 0), "version": str(version)}
    return out


def walk_files(directory: PathLike) -> list[str]:
    """Every file below a directory, recursively, as full paths, sorted."""
    return [join(directory, *rel.split("/")) for rel in list_files(directory)]


# --------------------------------------------------------------------------------------- read/write
def open_binary(path: PathLike) -> IO[bytes]:
    """Open a file for reading bytes."""
    return _fs(path).open(str(path), "rb") if is_remote(path) else open(path, "rb")


def read_bytes(path: PathLike) -> bytes:
    try:
        if is_remote(path):
            return _fs(path).cat_file(str(path))
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None


def read_text(path: PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write a file so that readers never see half of it (local: temp file + rename; remote: one upload)."""
    if is_remote(path):
        _fs(path).pipe_file(str(path), data)
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. disk full: no hidden half-file left behind
        raise
    fsync_dir(p.parent)


def fsync_dir(path: PathLike) -> None:
    """Make a rename or a new entry in the local directory `path` durable (a no-op where dirs cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: PathLike) -> None:
    """fsync every file and directory under the local `path`, before a rename publishes it: a power cut right
    after the rename must not leave a published directory of empty or half-written files."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def write_text_atomic(path: PathLike, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


write_text = write_text_atomic


def makedirs(path: PathLike) -> None:
    """Create a local directory (and parents); a no-op on buckets, which have no directories."""
    if not is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike) -> None:
    """Delete a file if it exists."""
    if is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            _fs(path).rm_file(str(path))
    else:
        Path(path).unlink(missing_ok=True)


def rmtree(path: PathLike) -> None:
    """Delete a directory (every object under a URL prefix) if it exists."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    objects = [join(path, rel) for rel in list_files(path)]
    if objects:
        _fs(path).rm(objects)  # batched deletes


# ------------------------------------------------------------------------------------- transfers
def _ordered(files: Iterable[str], last: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split relative paths into (first, last): `last` holds files whose base name is in `last`, in that order."""
    files = sorted(files)
    rank = {n: i for i, n in enumerate(last)}
    tail = sorted((f for f in files if name(f) in rank), key=lambda f: (rank[name(f)], f.count("/") * -1, f))
    return [f for f in files if name(f) not in rank], tail


def upload_dir(local_dir: PathLike, dest: PathLike, *, last: Sequence[str] = ()) -> list[str]:
    """Copy every file under `local_dir` to `dest`; files named in `last` go after all others, in that order
    (deepest first, so a subdirectory's marker lands before its parent's). Returns the relative paths."""
    root = Path(local_dir)
    rels = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
    first, tail = _ordered(rels, last)
    if not is_remote(dest):
        for rel in first + tail:
            target = Path(dest) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, target)
        return first + tail
    fs = _fs(dest)
    if first:
        fs.put([str(root / r) for r in first], [join(dest, r) for r in first])
    for rel in tail:  # one by one: their order is the commit protocol
        fs.put_file(str(root / rel), join(dest, rel))
    return first + tail


def download_dir(src: PathLike, local_dir: PathLike, *, include: Sequence[str] | None = None) -> list[str]:
    """Copy the files under `src` (those whose base name matches a pattern of `include`, if given) into
    `local_dir`. Returns the relative paths copied."""
    rels = [r for r in list_files(src) if include is None or any(fnmatch.fnmatch(name(r), p) for p in include)]
    for r in rels:
        check_relative(r, where=f"{src} (listing)", what="object name")
    local = Path(local_dir)
    for rel in rels:
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
    if is_remote(src):
        if rels:
            _fs(src).get([join(src, r) for r in rels], [str(local / r) for r in rels])
    else:
        for rel in rels:
            shutil.copyfile(Path(src) / rel, local / rel)
    return rels


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "boomerang")


def local_copy(url: PathLike, *, dest: PathLike | None = None, include: Sequence[str] | None = None,
               require: str | None = None, what: str = "directory") -> Path:
    """A local directory holding the files of remote directory `url` (local paths are returned as they are).

    Downloaded into `dest`, or into the cache (`$BOOMERANG_CACHE/gcs/<bucket>/<key>`) where it is reused
    while the remote listing (names, sizes, generations) is unchanged. `require` names a file that must be
    there (a marker such as config.json): without it the remote directory is incomplete, and that is an
    error naming it. The copy is assembled in a hidden sibling and renamed into place.
    """
    if not is_remote(url):
        return Path(url)
    url = str(url).rstrip("/")
    listing = {r: v for r, v in list_files(url).items()
               if include is None or any(fnmatch.fnmatch(name(r), p) for p in include)}
    if not listing:
        raise FileNotFoundError(f"{url}: no such {what} (no objects under this prefix)")
    for r in listing:
        check_relative(r, where=f"{url} (listing)", what="object name")
    if require is not None and require not in listing:
        raise FileNotFoundError(f"{url}: no {require}; not a complete {what} (an export to it may not have "
                                "finished)")
    scheme, bucket, key = split_url(url)
    target = Path(dest) if dest is not None else cache_root() / scheme / bucket / key
    manifest = {"url": url, "objects": listing}
    marker = target / _MANIFEST
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == manifest:
                return target
        except (OSError, json.JSONDecodeError):
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        if listing:
            _fs(url).get([join(url, r) for r in listing], [str(tmp / r) for r in listing])
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def replace_dir(tmp: PathLike, out: PathLike) -> None:
    """Move the finished local `tmp` to `out`; an existing `out` is removed only after the new one is in place."""
    tmp, out = Path(tmp), Path(out)
    fsync_tree(tmp)
    if not out.exists():
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
