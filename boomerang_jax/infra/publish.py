"""Publishing a directory only when it is complete: exports (HF directories, families) and prepared data are
assembled locally and appear at their destination all at once, or not at all (see `boomerang_jax.infra.storage`
for the rules on a bucket, where there is no directory rename)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from boomerang_jax.infra.storage import (
    STAGING_ENV, PathLike, exists, is_remote, join, remove, replace_dir, rmtree, split_url, upload_dir,
)


def occupied(dest: PathLike, marker: str) -> bool:
    """Whether publishing at `dest` would replace something: locally any existing path; on a bucket a
    complete export (its marker), since marker-less objects are leftovers of an interrupted one."""
    return exists(join(dest, marker)) if is_remote(dest) else Path(dest).exists()


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def refuse_replacing_inputs(dest: PathLike, inputs: Sequence[PathLike | None], *,
                            error: type[Exception] = FileExistsError) -> None:
    """Refuse an output that is, or contains, one of the command's inputs: `--overwrite` would replace the very
    model or data the command reads (an export over its own source, a family over its student)."""
    def norm(p: PathLike) -> str:
        return str(p).rstrip("/") if is_remote(p) else str(Path(p).expanduser().resolve())

    out = norm(dest)
    for src in inputs:
        if src is None or (not is_remote(src) and not Path(src).expanduser().exists()):
            continue  # a hub id or the embedded teacher: nothing on disk to replace
        if is_remote(src) == is_remote(dest) and _inside(norm(src), out):
            raise error(f"{dest}: the output would replace the input {src} (it is, or contains, that input); "
                        "write to another directory")


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:partial|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(dest: PathLike) -> list[Path]:
    """Delete the hidden `.NAME.partial-*` / `.NAME.old-*` directories that killed exports to the local `dest`
    left beside it (their process is gone; one of a live export on this host is kept) and say so on stderr."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    removed = []
    for p in dest.parent.iterdir():
        m = _LEFTOVER.match(p.name)
        if not m or m["name"] != dest.name or not p.is_dir():
            continue
        if m["pid"] and int(m["pid"]) != os.getpid() and process_alive(int(m["pid"])):
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        shutil.rmtree(p, ignore_errors=True)
        print(f"removed {p}: left by an interrupted export to {dest} ({size / 1e6:.1f} MB)", file=sys.stderr)
        removed.append(p)
    return removed


class DirPublisher:
    """A directory assembled under the local `path` and published at `dest` only when complete.

    Local `dest`: `path` is a hidden sibling, renamed into place by `commit` (atomic; an existing `dest` is
    replaced only by a finished one). Remote `dest`: `path` is a local staging dir; the first `flush` or
    `commit` deletes the old `marker`, then the old objects, then uploads; `flush(sub)` uploads a finished
    subdirectory early (and frees its local disk), `commit` uploads the rest with the files named in `last`
    after all others and `marker` at the very end. A crash at any point leaves no `dest/marker` over a
    partial set.
    """

    def __init__(self, dest: PathLike, *, marker: str, overwrite: bool = False, last: Sequence[str] = (),
                 error: type[Exception] = FileExistsError) -> None:
        self.dest, self.marker, self.last = str(dest), marker, tuple(n for n in last if n != marker) + (marker,)
        self.remote = is_remote(dest)
        self._cleared = False
        if self.remote and not split_url(str(dest))[2]:
            raise error(f"{dest}: exports go into a directory of the bucket (gs://bucket/name), not its root")
        if not overwrite and occupied(dest, marker):
            raise error(f"{dest}: already exists (pass overwrite=True / --overwrite to replace it)")
        if self.remote:
            staging = os.environ.get(STAGING_ENV) or None
            if staging:
                Path(staging).mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix="boomerang-publish-", dir=staging))
        else:
            out = Path(dest)
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_siblings(out)
            self.path = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.path.mkdir()

    def _clear_old(self) -> None:
        if not self._cleared:
            remove(join(self.dest, self.marker))  # first: from here on the old set no longer looks complete
            rmtree(self.dest)
            self._cleared = True

    def flush(self, sub: str) -> None:
        """Remote: upload the finished subdirectory `sub` now and drop its local copy. Local: nothing to do."""
        if not self.remote:
            return
        self._clear_old()
        upload_dir(self.path / sub, join(self.dest, sub), last=self.last)
        shutil.rmtree(self.path / sub, ignore_errors=True)

    def commit(self) -> None:
        """Publish what is left under `path`, the marker last."""
        if self.remote:
            self._clear_old()
            upload_dir(self.path, self.dest, last=self.last)
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            replace_dir(self.path, self.dest)

    def abort(self) -> None:
        """Drop the local staging (a remote partial upload stays marker-less, and is cleared by the next export)."""
        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def publish_dir(dest: PathLike, *, marker: str, overwrite: bool = False, last: Sequence[str] = (),
                error: type[Exception] = FileExistsError) -> Iterator[DirPublisher]:
    """`DirPublisher` as a context: committed when the block exits cleanly, aborted otherwise."""
    pub = DirPublisher(dest, marker=marker, overwrite=overwrite, last=last, error=error)
    try:
        yield pub
        pub.commit()
    except BaseException:
        pub.abort()
        raise
