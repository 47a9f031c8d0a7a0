"""Training input: prepared ArrayRecord shards -> per-host documents -> shuffle -> pack -> batches (grain).

Batch contract (what the train step gets from `next(iterator)`): a dict of numpy int32 arrays [B, T],
B = `DataConfig.batch_size` rows *per host*, T = `DataConfig.seq_len`:
  tokens       input token ids (0 on padding)
  targets      the next token of the same document; arbitrary (0) wherever loss_mask is 0
  segment_ids  1..n numbering the documents (or document pieces) of a row; 0 on padding
  positions    0-based position within each segment (feed to RoPE); 0 on padding
  loss_mask    1 where `targets` is a real next token of the same document, 0 on padding and on each
               document's last token (EOS, which is itself a real input token predicted by the one before)
Attention: token i may attend to j iff segment_ids[i] == segment_ids[j] != 0 and j <= i.
Documents are `[BOS] + text + EOS` (see data.tokenize); a document that does not fit the rest of a row
continues in the next row as a new segment (positions restart at 0; its pieces keep their true targets).

Determinism: the order is a pure function of (dataset, seed, process_index, process_count, packing,
seq_len, batch_size). Host sharding: host i reads documents i, i+n, i+2n, ... of the prepared split, so
hosts are disjoint and together cover it. Resumption: `iterator.get_state()` is a small JSON-able dict;
`iterator.set_state(state)` on a freshly built iterator continues exactly (grain's orbax
`save`/`load` on the iterator use JSON too). With a finite `num_epochs` hosts may hold different numbers
of documents and so run out at different steps: train for a fixed number of steps with num_epochs=None.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import grain
import numpy as np

from boomerang_jax.data.packing import PACKINGS, document_features, pack, pad_batch
from boomerang_jax.data.prepare import Metadata
from boomerang_jax.infra import storage


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything that determines the stream of training batches for one host."""

    path: str                       # a prepared dataset directory (boomerang prepare-data)
    split: str = "train"
    seq_len: int = 2048             # T
    batch_size: int = 8             # rows per host per batch (B)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None   # None: repeat forever (each epoch reshuffled)
    packing: str = "concat"         # "concat" (no padding) or "first_fit" (no splitting of short documents)
    first_fit_bins: int = 64
    drop_remainder: bool = True     # False: the last batch is filled up with padding rows
    process_index: int = 0
    process_count: int = 1
    read_threads: int = 8
    read_buffer: int = 256
    worker_count: int = 0           # >0: grain multiprocessing workers (changes the order, stays deterministic)
    prefetch_batches: int = 0       # >0: batches prefetched by a background thread
    # Other prepared datasets mixed in, as (path, share of training tokens): e.g. (("runs/x/teacher-text", 0.5),)
    # gives half the tokens from there and the rest from `path`. Same split name and tokenizer in each.
    mix: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, process_count={self.process_count})")
        if self.batch_size < 1 or self.seq_len < 2:
            raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {self.batch_size} and {self.seq_len}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be None or >= 1, got {self.num_epochs}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        mix = tuple(_mix_entry(m) for m in self.mix)
        object.__setattr__(self, "mix", mix)
        total = sum(share for _, share in mix)
        if mix and not total < 1.0:
            raise ValueError(f"mix shares add up to {total:g}; they must leave a share (> 0) for {self.path}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        """Build from a config mapping (e.g. a YAML `data:` section), rejecting unknown keys by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; known: {sorted(names)}")
        return cls(**d)


def _mix_entry(entry: Any) -> tuple[str, float]:
    """(path, share) from a tuple/list or a {path, share} mapping (YAML); the share must be in (0, 1)."""
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - {"path", "share"})
        if unknown or "path" not in entry or "share" not in entry:
            raise ValueError(f"mix entry {dict(entry)}: expected keys path and share")
        path, share = entry["path"], entry["share"]
    elif isinstance(entry, (list, tuple)) and len(entry) == 2:
        path, share = entry
    else:
        raise ValueError(f"mix entry {entry!r}: expected (path, share) or {{path: ..., share: ...}}")
    share = float(share)
    if not 0.0 < share < 1.0:
        raise ValueError(f"mix entry {path}: share must be in (0, 1), got {share}")
    return str(path), share


def _decode(record: bytes, dtype: str) -> np.ndarray:
    return np.frombuffer(record, dtype=np.dtype(dtype)).astype(np.int32)


def open_documents(path: str, split: str = "train") -> tuple[grain.MapDataset, Metadata]:
    """The prepared split as a random-access dataset of int32 token arrays, plus its metadata."""
    meta = Metadata.load(path)
    shards = meta.shard_paths(path, split)
    if not shards:
        raise ValueError(f"split {split!r} of {path} has no shards (no documents)")
    source = grain.sources.ArrayRecordDataSource(shards)
    return grain.MapDataset.source(source).map(functools.partial(_decode, dtype=meta.dtype)), meta


def _host_part(cfg: DataConfig, path: str, seed: int) -> tuple[grain.MapDataset, Metadata]:
    docs, meta = open_documents(path, cfg.split)
    n = len(docs)
    docs = docs[cfg.process_index :: cfg.process_count]
    if len(docs) == 0:
        raise ValueError(f"{path} [{cfg.split}] has {n} documents: none left for host "
                         f"{cfg.process_index} of {cfg.process_count}")
    if cfg.shuffle:
        docs = docs.shuffle(seed=seed)
    if cfg.num_epochs != 1:
        docs = docs.repeat(cfg.num_epochs)
    return docs, meta


def host_documents(cfg: DataConfig) -> grain.MapDataset:
    """This host's documents in iteration order (sharded, shuffled, repeated), before packing.

    With `cfg.mix`, documents of every dataset are interleaved (deterministically) so that each supplies its
    share of the tokens: a dataset's documents are drawn in proportion to share / mean document length.
    With num_epochs set, the mixture ends when its first dataset runs out."""
    if not cfg.mix:
        return _host_part(cfg, cfg.path, cfg.seed)[0]
    parts, weights, first = [], [], None
    for i, (path, share) in enumerate(((cfg.path, 1.0 - sum(sh for _, sh in cfg.mix)), *cfg.mix)):
        part, meta = _host_part(cfg, path, cfg.seed + i)
        facts = {k: meta.tokenizer.get(k) for k in ("vocab_size", "eos_id", "bos_id")}
        first = first or facts
        if facts != first:
            raise ValueError(f"mix: {path} was tokenised differently from {cfg.path} ({facts} vs {first}); "
                             "prepare both with the same tokenizer")
        split = meta.splits[cfg.split]
        parts.append(part)
        weights.append(share / (split["num_tokens"] / split["num_docs"]))
    return grain.MapDataset.mix(parts, weights=weights)


def make_dataset(cfg: DataConfig) -> grain.IterDataset:
    """The grain pipeline producing this host's batches (see the module docstring for the contract)."""
    docs = host_documents(cfg).map(document_features)
    features = docs.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                      prefetch_buffer_size=cfg.read_buffer))
    rows = pack(features, cfg.seq_len, packing=cfg.packing, num_bins=cfg.first_fit_bins, seed=cfg.seed)
    if cfg.drop_remainder:
        batches = rows.batch(cfg.batch_size, drop_remainder=True)
    else:
        batches = rows.batch(cfg.batch_size, batch_fn=functools.partial(pad_batch, batch_size=cfg.batch_size))
    if cfg.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; scripts without app.run never parse them
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    if cfg.prefetch_batches > 0:
        from grain.experimental import ThreadPrefetchIterDataset

        batches = ThreadPrefetchIterDataset(batches, prefetch_buffer_size=cfg.prefetch_batches)
    return batches


def make_iterator(cfg: DataConfig, state: Mapping[str, Any] | None = None) -> grain.DatasetIterator:
    """A fresh iterator over this host's batches, optionally restored from `iterator.get_state()`."""
    it = iter(make_dataset(cfg))
    if state is not None:
        it.set_state(dict(state))
    return it


def dataset_info(path: str) -> dict[str, Any]:
    """Summary of a prepared dataset: tokenizer facts and per-split document/token counts."""
    meta = Metadata.load(path)
    return {
        "path": str(path),
        "dtype": meta.dtype,
        "tokenizer": meta.tokenizer,
        "splits": {k: {"num_docs": v["num_docs"], "num_tokens": v["num_tokens"], "num_shards": len(v["shards"])}
                   for k, v in meta.splits.items()},
        "remote": storage.is_remote(path),
    }
