"""Prepared datasets: a document source tokenised into ArrayRecord shards of token ids (`boomerang prepare-data`).

Layout of a prepared dataset directory (local or gs://, through infra.storage):
  metadata.json                    format, tokenizer (vocab, EOS/BOS ids), dtype, per-split shard list;
                                   written last, so a directory without it is incomplete
  <split>-00000.array_record ...   one record per document: its token ids as raw little-endian `dtype`
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from boomerang_jax.infra import publish, storage

FORMAT = "boomerang-tokens/1"
METADATA = "metadata.json"
SHARD_SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for global shuffling


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every token id: uint16 up to 65536 tokens, else int32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


@dataclasses.dataclass
class Metadata:
    """What `metadata.json` records about a prepared dataset."""

    dtype: str
    tokenizer: dict[str, Any]
    splits: dict[str, dict[str, Any]]
    source: Any = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> "Metadata":
        """Read `<path>/metadata.json`, with clear errors for incomplete or foreign directories."""
        meta_path = storage.join(path, METADATA)
        if not storage.exists(meta_path):
            raise FileNotFoundError(
                f"{meta_path} not found: {path!r} is not a prepared dataset (or preparation did not finish); "
                "create one with `boomerang prepare-data`"
            )
        try:
            raw = json.loads(storage.read_text(meta_path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: invalid JSON ({e.msg})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{meta_path}: expected a JSON object (a prepared dataset's metadata), "
                             f"got {type(raw).__name__}")
        if raw.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {raw.get('format')!r}, expected {FORMAT!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})

    def shard_paths(self, root: str, split: str) -> list[str]:
        if split not in self.splits:
            raise ValueError(f"split {split!r} not in the prepared dataset at {root} (have {sorted(self.splits)})")
        return [storage.join(root, s["file"]) for s in self.splits[split]["shards"]]


class _ShardWriter:
    """Writes one split's documents into size-capped ArrayRecord shards."""

    def __init__(self, local_dir: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.local_dir, self.split, self.dtype, self.shard_tokens = local_dir, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._writer = None

    def _open(self) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        fname = f"{self.split}-{len(self.shards):05d}{SHARD_SUFFIX}"
        self._writer = ArrayRecordWriter(storage.join(self.local_dir, fname), WRITER_OPTIONS)
        self.shards.append({"file": fname, "num_docs": 0, "num_tokens": 0})

    def write(self, ids: np.ndarray) -> None:
        if self._writer is None or self.shards[-1]["num_tokens"] >= self.shard_tokens:
            self.close()
            self._open()
        self._writer.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        self.shards[-1]["num_docs"] += 1
        self.shards[-1]["num_tokens"] += int(len(ids))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def summary(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "num_docs": sum(s["num_docs"] for s in self.shards),
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
        }


def prepare_dataset(
    docs: Iterable[str],
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
) -> Metadata:
    """Tokenise `docs` with a DocumentEncoder and write them as shards + metadata.json under `out_dir`.

    Empty (whitespace-only) documents are skipped. With `val_fraction` > 0 each document goes to
    `val_split` with that probability (a seeded draw per document, so the split is reproducible).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction > 0 and val_split == split:
        raise ValueError(f"the validation split needs a name other than {split!r}")
    meta_path = storage.join(out_dir, METADATA)
    if storage.exists(meta_path) and not overwrite:
        raise FileExistsError(f"{meta_path} exists; pass overwrite=True (--overwrite) to replace the dataset")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    dtype = token_dtype(encoder.vocab_size)
    rng = np.random.default_rng(seed)
    n_docs = n_skipped = n_tokens = 0
    t0 = last = time.perf_counter()

    def texts() -> Iterable[str]:
        nonlocal n_docs, n_skipped
        for text in docs:
            if max_docs is not None and n_docs >= max_docs:
                return
            if not text or not text.strip():
                n_skipped += 1
                continue
            n_docs += 1
            yield text

    # built beside the destination (or in local staging for a bucket) and published only when complete, so a
    # source that fails half-way (bad UTF-8, a missing file) leaves an existing dataset exactly as it was
    empty = not storage.is_remote(out_dir) and Path(out_dir).is_dir() and not any(Path(out_dir).iterdir())
    with publish.publish_dir(out_dir, marker=METADATA, overwrite=overwrite or empty) as pub:
        local = str(pub.path)
        writers = {split: _ShardWriter(local, split, dtype, shard_tokens)}
        if val_fraction > 0:
            writers[val_split] = _ShardWriter(local, val_split, dtype, shard_tokens)
        try:
            for ids in encoder.encode_stream(texts(), batch_size=batch_size):
                to_val = val_fraction > 0 and rng.random() < val_fraction
                writers[val_split if to_val else split].write(ids)
                n_tokens += len(ids)
                now = time.perf_counter()
                if now - last > log_every_s:
                    last = now
                    log(f"  {n_docs} documents, {n_tokens / 1e6:.1f}M tokens, {n_tokens / (now - t0) / 1e3:.0f}k tok/s")
        finally:
            for w in writers.values():
                w.close()
        if n_docs == 0:
            raise ValueError(f"the source yielded no non-empty documents ({n_skipped} empty ones skipped)")
        meta = Metadata(
            dtype=dtype.str,
            tokenizer=encoder.describe(),
            splits={name: w.summary() for name, w in writers.items()},
            source=source,
            options={"val_fraction": val_fraction, "seed": seed, "skipped_empty_docs": n_skipped},
        )
        storage.write_text_atomic(storage.join(local, METADATA), meta.to_json())
    return meta
