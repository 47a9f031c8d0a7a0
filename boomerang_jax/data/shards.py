"""Resumable, parallel `prepare-data`: the document stream is cut into work shards ("pieces") of `piece_docs`
non-empty documents, numbered in stream order; any number of processes (and machines) tokenise disjoint sets
of pieces, each piece published atomically with its own marker, and the dataset is assembled from them.

Build directory: `.NAME.partial-build-KEY` beside the destination (local or gs://), KEY a hash of every
setting that decides the output bytes (source files with sizes and mtimes, tokenizer, splits, seed, ...), so
a rerun with the same settings finds it and skips finished pieces, and other settings never reuse it:
  pieces/p00003-train-00000.array_record ...  a piece's shards (split by `shard_tokens` as before)
  pieces/piece-00003.json                     its marker, written (atomically) after its shards
  stream.json                                 documents in the stream, empty ones skipped, pieces
Process `index` of `count` takes pieces k with k % count == index. Every process reads the whole stream
(reading and skipping text is cheap next to tokenising it) and so learns the number of pieces. The output
is a pure function of the settings: piece k holds documents [k * piece_docs, (k + 1) * piece_docs), the
validation draw of document i is the i-th draw of `default_rng(seed)` (as in a single pass), and the final
shards are the pieces' shards in piece order, renamed `<split>-00000.array_record`, ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from boomerang_jax.data.records import METADATA, SHARD_SUFFIX, Metadata, ShardWriter, token_dtype
from boomerang_jax.infra import publish, storage

PIECES, STREAM = "pieces", "stream.json"
_MARKER = re.compile(r"^piece-(\d{5,})\.json$")
ONE_PIECE = 1 << 62  # piece_docs=None: the whole stream is one piece


class IncompleteBuild(ValueError):
    """`finish` asked for while pieces are missing; the message says which, and where the build is."""


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """What decides the pieces (and so the dataset), plus this process's share of them."""

    split: str = "train"
    val_split: str = "validation"
    val_fraction: float = 0.0
    seed: int = 0
    shard_tokens: int = 1 << 26
    max_docs: int | None = None
    piece_docs: int | None = None
    batch_size: int = 256
    index: int = 0
    count: int = 1

    @property
    def docs_per_piece(self) -> int:
        return self.piece_docs or ONE_PIECE

    def splits(self) -> list[str]:
        return [self.split] + ([self.val_split] if self.val_fraction > 0 else [])


def settings_key(settings: dict[str, Any]) -> str:
    """A short stable hash of JSON-able settings: the build directory's name."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_path(out_dir: str, key: str) -> str:
    """The hidden build directory beside `out_dir` for settings `key`."""
    return storage.join(storage.parent(out_dir), f".{storage.name(out_dir)}.partial-build-{key}")


def _marker(k: int) -> str:
    return f"piece-{k:05d}.json"


def done_pieces(build: str) -> dict[int, dict[str, Any]]:
    """The published pieces of a build: piece number -> its marker."""
    root = storage.join(build, PIECES)
    out = {}
    for name in storage.listdir(root):
        m = _MARKER.match(name)
        if m:
            out[int(m[1])] = json.loads(storage.read_text(storage.join(root, name)))
    return out


def _staging(build: str) -> Path:
    """A private local directory to write a piece in: inside a local build (same file system, so publishing
    is a rename; leftovers of dead processes are removed), in the temp/staging dir for a remote one."""
    if storage.is_remote(build):
        staging = os.environ.get(storage.STAGING_ENV) or None
        if staging:
            Path(staging).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="boomerang-piece-", dir=staging))
    tmp = Path(build) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for old in tmp.iterdir():
        pid = old.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not publish.process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = tmp / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


class _Piece:
    """One piece being tokenised: documents in, shards written locally, published with its marker last."""

    def __init__(self, k: int, build: str, cfg: BuildConfig, encoder: Any):
        self.k, self.build, self.cfg, self.encoder = k, build, cfg, encoder
        self.local = _staging(build)
        dtype = token_dtype(encoder.vocab_size)
        prefix = f"p{k:05d}-"
        self.writers = {s: ShardWriter(str(self.local), s, dtype, cfg.shard_tokens, prefix=prefix)
                        for s in cfg.splits()}
        bits = np.random.PCG64(cfg.seed)
        bits.advance(k * cfg.docs_per_piece)  # document i's draw is the i-th of default_rng(seed)
        self.rng = np.random.Generator(bits)
        self.batch: list[str] = []
        self.num_tokens = 0

    def add(self, text: str) -> None:
        self.batch.append(text)
        if len(self.batch) >= self.cfg.batch_size:
            self._flush()

    def _flush(self) -> None:
        cfg = self.cfg
        for ids in self.encoder.encode_batch(self.batch):
            to_val = cfg.val_fraction > 0 and self.rng.random() < cfg.val_fraction
            self.writers[cfg.val_split if to_val else cfg.split].write(ids)
            self.num_tokens += len(ids)
        self.batch = []

    def publish(self) -> dict[str, Any]:
        """Close the shards, move them into the build's pieces/ (fsynced), then write the marker."""
        try:
            self._flush()
            for w in self.writers.values():
                w.close()
            summary = {s: w.summary() for s, w in self.writers.items()}
            marker = {"piece": self.k, "first_doc": self.k * self.cfg.docs_per_piece,
                      "num_docs": sum(s["num_docs"] for s in summary.values()), "num_tokens": self.num_tokens,
                      "splits": summary}
            dest = storage.join(self.build, PIECES)
            if storage.is_remote(dest):
                (self.local / _marker(self.k)).write_text(json.dumps(marker, sort_keys=True))
                storage.upload_dir(self.local, dest, last=[_marker(self.k)])
            else:
                Path(dest).mkdir(parents=True, exist_ok=True)
                storage.fsync_tree(self.local)
                for f in sorted(self.local.iterdir()):
                    os.replace(f, Path(dest) / f.name)
                storage.fsync_dir(dest)
                storage.write_text_atomic(storage.join(dest, _marker(self.k)), json.dumps(marker, sort_keys=True))
            return marker
        finally:
            self.abort()

    def abort(self) -> None:
        for w in self.writers.values():
            w.close()
        shutil.rmtree(self.local, ignore_errors=True)


def _non_empty(docs: Iterable[str], cfg: BuildConfig, counts: dict[str, int]) -> Iterator[str]:
    for text in docs:
        if cfg.max_docs is not None and counts["docs"] >= cfg.max_docs:
            return
        if not text or not text.strip():
            counts["skipped"] += 1
            continue
        counts["docs"] += 1
        yield text


def build_pieces(docs: Iterable[str], encoder: Any, build: str, cfg: BuildConfig,
                 log: Callable[[str], None], log_every_s: float = 30.0) -> dict[str, int]:
    """Tokenise this process's unfinished pieces of `docs` into `build`; returns (and records in stream.json)
    the stream's counts: {num_docs, skipped_empty_docs, num_pieces}."""
    storage.makedirs(build)
    done = done_pieces(build)
    mine = [k for k in done if k % cfg.count == cfg.index]
    if mine:
        log(f"resuming {build}: {len(mine)} finished shard(s) of this process are skipped")
    per, counts = cfg.docs_per_piece, {"docs": 0, "skipped": 0}
    piece: _Piece | None = None
    new = tokens = 0
    t0 = last = time.perf_counter()
    try:
        for text in _non_empty(docs, cfg, counts):
            k = (counts["docs"] - 1) // per
            if k % cfg.count != cfg.index or k in done:
                continue
            if piece is None:
                piece = _Piece(k, build, cfg, encoder)
            piece.add(text)
            if counts["docs"] == (k + 1) * per:
                tokens += piece.publish()["num_tokens"]
                piece, new = None, new + 1
            now = time.perf_counter()
            if now - last > log_every_s:
                last = now
                log(f"  {counts['docs']} documents read, {new} shard(s) written, {tokens / 1e6:.1f}M tokens, "
                    f"{tokens / (now - t0) / 1e3:.0f}k tok/s")
        if piece is not None:
            piece.publish()
            piece, new = None, new + 1
    finally:
        if piece is not None:
            piece.abort()
    n = counts["docs"]
    if n == 0:
        raise ValueError(f"the source yielded no non-empty documents ({counts['skipped']} empty ones skipped)")
    stream = {"num_docs": n, "skipped_empty_docs": counts["skipped"], "num_pieces": -(-n // per)}
    path = storage.join(build, STREAM)
    if storage.exists(path):
        seen = json.loads(storage.read_text(path))
        if seen != stream:
            raise ValueError(f"{path}: the source changed while it was being prepared (now {stream}, "
                             f"before {seen}); delete {build} and rerun")
    else:
        storage.write_text_atomic(path, json.dumps(stream, sort_keys=True))
    log(f"shards of process {cfg.index}/{cfg.count}: {new} written now, {len(mine)} done before")
    return stream


@contextlib.contextmanager
def _finish_lock(build: str) -> Iterator[None]:
    """Local builds: one finisher at a time (flock, released when its process dies). Remote: none (finishing
    twice writes the same objects)."""
    if storage.is_remote(build) or not Path(build).is_dir():
        yield
        return
    import fcntl

    with open(Path(build) / ".finish.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def finish_build(build: str, out_dir: str, cfg: BuildConfig, *, tokenizer: dict[str, Any], dtype: str,
                 source: Any, overwrite: bool, strict: bool, log: Callable[[str], None]) -> Metadata | None:
    """Assemble the finished pieces into the dataset at `out_dir` (metadata.json last) and delete the build.
    With pieces still missing: None, or an IncompleteBuild naming them when `strict`."""
    with _finish_lock(build):
        stream_path = storage.join(build, STREAM)
        if not storage.exists(stream_path):
            if storage.exists(storage.join(out_dir, METADATA)) and not storage.exists(build):
                return Metadata.load(out_dir)  # another process finished it meanwhile
            if strict:
                raise IncompleteBuild(f"{build}: no process has read the source to its end yet (no {STREAM}); "
                                      "run the workers first")
            return None
        stream = json.loads(storage.read_text(stream_path))
        done = done_pieces(build)
        missing = [k for k in range(stream["num_pieces"]) if k not in done]
        if missing:
            if strict:
                raise IncompleteBuild(f"{build}: {len(missing)} of {stream['num_pieces']} shards are not done "
                                      f"(e.g. {missing[:8]}); run the workers that take them")
            log(f"{stream['num_pieces'] - len(missing)} of {stream['num_pieces']} shards done; the process that "
                "finds them all done (or `prepare-data ... --finish`) writes the dataset")
            return None
        files, splits = [], {}
        for name in cfg.splits():
            shards = []
            for k in range(stream["num_pieces"]):
                for s in done[k]["splits"][name]["shards"]:
                    files.append((s["file"], f"{name}-{len(shards):05d}{SHARD_SUFFIX}"))
                    shards.append({**s, "file": files[-1][1]})
            splits[name] = {"shards": shards, "num_docs": sum(s["num_docs"] for s in shards),
                            "num_tokens": sum(s["num_tokens"] for s in shards)}
        meta = Metadata(dtype=dtype, tokenizer=tokenizer, splits=splits, source=source,
                        options={"val_fraction": cfg.val_fraction, "seed": cfg.seed, "shard_docs": cfg.piece_docs,
                                 "skipped_empty_docs": stream["skipped_empty_docs"]})
        _publish(build, out_dir, files, meta.to_json(), overwrite)
        storage.rmtree(build)
    return meta


def _publish(build: str, out_dir: str, files: list[tuple[str, str]], meta_json: str, overwrite: bool) -> None:
    """Put the renamed pieces and metadata.json at `out_dir`; an existing dataset is replaced only by a
    complete one (local: a rename; bucket: old marker deleted, new objects copied, new marker last)."""
    pieces, meta_path = storage.join(build, PIECES), storage.join(out_dir, METADATA)
    if storage.is_remote(out_dir):
        if storage.exists(meta_path) and storage.read_text(meta_path) == meta_json:
            return  # published by another process already
        if storage.exists(meta_path) and not overwrite:
            raise FileExistsError(f"{meta_path} exists; pass --overwrite to replace the dataset")
        storage.remove(meta_path)
        keep = {new for _, new in files}
        stale = [storage.join(out_dir, r) for r in storage.list_files(out_dir) if r not in keep]
        for p in stale:
            storage.remove(p)
        fs = storage._fs(out_dir)
        for old, new in files:
            fs.copy(storage.join(pieces, old), storage.join(out_dir, new))  # server-side, no download
        storage.write_text_atomic(meta_path, meta_json)
        return
    staging = Path(build) / "dataset"
    shutil.rmtree(staging, ignore_errors=True)  # a finisher killed half-way left it
    staging.mkdir()
    for old, new in files:
        try:
            os.link(Path(pieces) / old, staging / new)  # pieces stay intact until the dataset is in place
        except OSError:
            shutil.copyfile(Path(pieces) / old, staging / new)
    (staging / METADATA).write_text(meta_json)
    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    storage.replace_dir(staging, out)
