"""The prepared dataset's files (what `boomerang prepare-data` writes and data.pipeline reads).

Layout of a prepared dataset directory (local or gs://, through infra.storage):
  metadata.json                    format, tokenizer (vocab, EOS/BOS ids), dtype, per-split shard list;
                                   written last, so a directory without it is incomplete
  <split>-00000.array_record ...   one record per document: its token ids as raw little-endian `dtype`
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from boomerang_jax.infra import storage

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


class ShardWriter:
    """Writes one split's documents into size-capped ArrayRecord shards."""

    def __init__(self, local_dir: str, split: str, dtype: np.dtype, shard_tokens: int, prefix: str = ""):
        self.local_dir, self.split, self.dtype, self.shard_tokens = local_dir, split, dtype, shard_tokens
        self.prefix = prefix
        self.shards: list[dict[str, Any]] = []
        self._writer = None

    def _open(self) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        fname = f"{self.prefix}{self.split}-{len(self.shards):05d}{SHARD_SUFFIX}"
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
