"""Pack tokenised documents into fixed-length rows with segment ids, using grain's packing transforms.

Each document becomes three aligned features before packing: `tokens`, `targets` (the next token of the
same document) and `loss_mask` (0 on the document's last token). Because targets are computed per
document *before* packing, a document split across rows keeps the right target at the end of each piece,
and no packed row ever needs to look past its own segment.

The row contract (per host, after batching: numpy int32 arrays [B, T]):
  tokens       input token ids; 0 on padding.
  targets      next token of the same document; arbitrary (0) where loss_mask is 0.
  segment_ids  1..n numbering the documents (or document pieces) in a row; 0 on padding.
  positions    0-based position within each segment; 0 on padding.
  loss_mask    1 where `targets` is a real next token of the same document; 0 on padding and on each
               document's last token (its EOS).
Attention must stay within a segment: allow i -> j iff segment_ids[i] == segment_ids[j] != 0 and j <= i.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np
from grain.experimental import (
    ConcatThenSplitIterDataset,
    FirstFitPackIterDataset,
    FlatMapIterDataset,
    FlatMapTransform,
)

from boomerang_jax.models.batch import BATCH_KEYS

FEATURES = ("tokens", "targets", "loss_mask")
PACKINGS = ("concat", "first_fit")


def document_features(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """tokens / targets (shifted by one within the document) / loss_mask (0 on the last token) for a document."""
    tokens = np.asarray(tokens, dtype=np.int32)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"a document must be a non-empty 1-D array of token ids, got shape {tokens.shape}")
    targets = np.zeros_like(tokens)
    targets[:-1] = tokens[1:]
    loss_mask = np.ones_like(tokens)
    loss_mask[-1] = 0
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}


class _SplitLong(FlatMapTransform):
    """Cut a document's features into pieces of at most `seq_len` tokens (each becomes its own segment)."""

    max_fan_out = 1 << 30  # not enforced by FlatMapIterDataset; pieces are computed from the length

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, element: Mapping[str, np.ndarray]) -> Sequence[dict[str, np.ndarray]]:
        n = len(element["tokens"])
        return [{k: v[s : s + self.seq_len] for k, v in element.items()} for s in range(0, n, self.seq_len)]


def _tuplify_slices(state: Any) -> Any:
    """Undo JSON's tuple->list in ConcatThenSplit states (it compares slices with the tuple (-1, -1))."""
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            if k == "remainder_slices" and isinstance(v, dict):
                out[k] = {f: tuple(s) for f, s in v.items()}
            else:
                out[k] = _tuplify_slices(v)
        return out
    return state


class _JsonSafeIterator(grain.DatasetIterator):
    """Pass-through iterator whose set_state accepts states that went through JSON (orbax saves them so)."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)

    def __next__(self) -> Any:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_tuplify_slices(state))


class _ConcatThenSplit(ConcatThenSplitIterDataset):
    """grain's ConcatThenSplitIterDataset, restorable from JSON-serialised states."""

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonSafeIterator(super().__iter__())


def _to_row(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename grain's packed features (`tokens_segment_ids`, ...) into the row contract, all int32."""
    return {
        "tokens": packed["tokens"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": packed["tokens_segment_ids"].astype(np.int32),
        "positions": packed["tokens_positions"].astype(np.int32),
        "loss_mask": packed["loss_mask"].astype(np.int32),
    }


def pack(
    features: grain.IterDataset, seq_len: int, *, packing: str = "concat", num_bins: int = 64, seed: int = 0
) -> grain.IterDataset:
    """Pack per-document features into rows of `seq_len` tokens (the row contract above).

    `concat` (default): grain's ConcatThenSplit; rows are filled completely (padding only in the very last
    row); a document that does not fit is continued in the next row as a new segment.
    `first_fit`: documents are cut into pieces of at most `seq_len` and first-fit packed into `num_bins`
    rows at a time; a document is only ever split when longer than `seq_len`, at the price of some padding.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    lengths = {k: seq_len for k in FEATURES}
    if packing == "concat":
        packed = _ConcatThenSplit(features, length_struct=lengths)
    elif packing == "first_fit":
        pieces = FlatMapIterDataset(features, _SplitLong(seq_len))
        packed = FirstFitPackIterDataset(
            pieces, length_struct=lengths, num_packing_bins=num_bins, seed=seed, shuffle_bins=True
        )
    else:
        raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")
    return packed.map(_to_row)


def pad_batch(rows: Sequence[Mapping[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
    """Stack rows into a batch, filling missing rows with padding (all zeros: segment 0, loss_mask 0)."""
    out = {}
    for k in BATCH_KEYS:
        stacked = np.stack([r[k] for r in rows])
        if len(rows) < batch_size:
            stacked = np.concatenate([stacked, np.zeros((batch_size - len(rows), *stacked.shape[1:]), stacked.dtype)])
        out[k] = stacked
    return out


def check_batch(batch: Mapping[str, np.ndarray], seq_len: int | None = None) -> None:
    """Raise ValueError unless `batch` ([B, T] or [T]) obeys the row contract in this module's docstring."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}")
    shape = batch["tokens"].shape
    for k in BATCH_KEYS:
        a = batch[k]
        if a.shape != shape or a.dtype != np.int32:
            raise ValueError(f"{k}: shape {a.shape} dtype {a.dtype}, expected {shape} int32")
    if seq_len is not None and shape[-1] != seq_len:
        raise ValueError(f"rows have {shape[-1]} tokens, expected {seq_len}")
    seg = batch["segment_ids"].reshape(-1, shape[-1])
    pos = batch["positions"].reshape(-1, shape[-1])
    mask = batch["loss_mask"].reshape(-1, shape[-1])
    tok = batch["tokens"].reshape(-1, shape[-1])
    tgt = batch["targets"].reshape(-1, shape[-1])
    pad = seg == 0
    if np.any(mask[pad]) or np.any(pos[pad]) or np.any(tok[pad]):
        raise ValueError("padding positions must have loss_mask 0, positions 0 and tokens 0")
    if not np.all(np.isin(mask, (0, 1))):
        raise ValueError("loss_mask must be 0/1")
    start = np.ones_like(pad)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    if np.any(pos[start & ~pad] != 0):
        raise ValueError("every segment must start at position 0")
    cont = ~start & ~pad
    if np.any(pos[:, 1:][cont[:, 1:]] != pos[:, :-1][cont[:, 1:]] + 1):
        raise ValueError("positions must count up by one within a segment")
    # Segment ids count 1, 2, ... in order along each row, then padding.
    for r in range(seg.shape[0]):
        ids = seg[r][start[r] & ~pad[r]]
        if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
            raise ValueError(f"row {r}: segment ids {ids.tolist()} are not 1..n in order")
        if np.any(np.diff(pad[r].astype(np.int8)) < 0):
            raise ValueError(f"row {r}: padding must come after all segments")
    # Inside a segment, a real target is the next input token.
    inner = (mask[:, :-1] == 1) & (seg[:, 1:] == seg[:, :-1]) & ~pad[:, :-1]
    if np.any(tgt[:, :-1][inner] != tok[:, 1:][inner]):
        raise ValueError("targets must equal the next token within a segment")
