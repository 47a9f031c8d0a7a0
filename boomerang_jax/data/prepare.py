"""Prepared datasets: a document source tokenised into ArrayRecord shards of token ids (`boomerang prepare-data`),
in work shards that several processes or machines share and a rerun resumes (data.shards); the files'
format is in data.records.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable

from boomerang_jax.data import shards
from boomerang_jax.data.records import FORMAT, METADATA, SHARD_SUFFIX, WRITER_OPTIONS, Metadata, token_dtype
from boomerang_jax.infra import storage

__all__ = ["FORMAT", "METADATA", "SHARD_SUFFIX", "WRITER_OPTIONS", "Metadata", "prepare_dataset", "token_dtype"]


def prepare_dataset(
    docs: Iterable[str] | None,
    encoder: Any,
    out_dir: str,
    *,
    split: str = "train",
    val_split: str = "validation",
    val_fraction: float = 0.0,
    seed: int = 0,
    shard_tokens: int = 1 << 26,
    max_docs: int | None = None,
    batch_size: int = 256,
    overwrite: bool = False,
    source: Any = None,
    log_every_s: float = 30.0,
    log: Any = None,
    shard_docs: int | None = None,
    resume_key: str | None = None,
    shard_of: tuple[int, int] = (0, 1),
    finish: bool = True,
    strict: bool = False,
) -> Metadata | None:
    """Tokenise `docs` with a DocumentEncoder and write them as shards + metadata.json under `out_dir`.

    Empty (whitespace-only) documents are skipped. With `val_fraction` > 0 each document goes to
    `val_split` with that probability (a seeded draw per document, so the split is reproducible).

    Resumable and parallel (see data.shards): the stream is cut into work shards of `shard_docs` documents
    (None: one), of which this process takes those k with k % count == index (`shard_of=(index, count)`),
    built in `.NAME.partial-build-<resume_key>` beside `out_dir`: a rerun with the same key skips the shards
    already published there. Without a key the build is private to this call and deleted if it fails. With
    `finish`, the process that finds every shard done writes the dataset (None when some are not done; with
    `strict`, an error naming them). `docs=None` only finishes. Returns the metadata, or None.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction > 0 and val_split == split:
        raise ValueError(f"the validation split needs a name other than {split!r}")
    index, count = shard_of
    if not 0 <= index < count:
        raise ValueError(f"shard_of: index {index} not in [0, count={count})")
    if shard_docs is not None and shard_docs < 1:
        raise ValueError(f"shard_docs must be >= 1, got {shard_docs}")
    meta_path = storage.join(out_dir, METADATA)
    if storage.exists(meta_path) and not overwrite:
        raise FileExistsError(f"{meta_path} exists; pass overwrite=True (--overwrite) to replace the dataset")
    empty = not storage.is_remote(out_dir) and Path(out_dir).is_dir() and not any(Path(out_dir).iterdir())
    if not storage.is_remote(out_dir) and Path(out_dir).exists() and not (overwrite or empty):
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    if storage.is_remote(out_dir) and not storage.split_url(str(out_dir))[2]:
        raise ValueError(f"{out_dir}: a prepared dataset goes into a directory of the bucket, not its root")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg = shards.BuildConfig(split=split, val_split=val_split, val_fraction=val_fraction, seed=seed,
                             shard_tokens=shard_tokens, max_docs=max_docs, piece_docs=shard_docs,
                             batch_size=batch_size, index=index, count=count)
    build = shards.build_path(out_dir, resume_key or f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        if docs is not None:
            shards.build_pieces(docs, encoder, build, cfg, log, log_every_s)
        if not finish:
            return None
        return shards.finish_build(build, out_dir, cfg, tokenizer=encoder.describe(),
                                   dtype=token_dtype(encoder.vocab_size).str, source=source,
                                   overwrite=overwrite or empty, strict=strict, log=log)
    except BaseException as e:
        # a source that fails half-way (bad UTF-8, a missing file) would fail the same way again: its build goes
        # (an existing dataset stays exactly as it was); an interruption or an I/O error keeps a keyed build
        if resume_key is None or (isinstance(e, ValueError) and not isinstance(e, shards.IncompleteBuild)):
            storage.rmtree(build)
        elif storage.exists(build):
            log(f"the finished shards are kept in {build}: rerun the same command to resume")
        raise
