"""Evaluation batches from any data spec: a prepared dataset, or raw text tokenised on the fly."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from boomerang_jax.data.pipeline import DataConfig, make_iterator
from boomerang_jax.data.prepare import METADATA, prepare_dataset
from boomerang_jax.data.documents import read_documents
from boomerang_jax.data.tokenize import DocumentEncoder, load_tokenizer, tokenizer_from_files


def is_prepared(spec: str) -> bool:
    """Whether `spec` is a local prepared dataset directory (`boomerang prepare-data`: has its metadata.json)."""
    return Path(spec).is_dir() and (Path(spec) / METADATA).exists()


def load_batches(data: str, *, tokenizer_files: dict[str, bytes] | None = None, tokenizer: str | None = None,
                 split: str = "train", seq_len: int = 512, batch_size: int = 4, max_tokens: int | None = None,
                 text_field: str = "text") -> list[dict[str, np.ndarray]]:
    """Evaluation batches (first-fit packed, in order) from a prepared dataset or any raw source, which is
    tokenised with `tokenizer` (a path) or the model's `tokenizer_files`; stops after about `max_tokens`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = data
        if not is_prepared(data):
            if tokenizer:
                tok = load_tokenizer(tokenizer)
            elif tokenizer_files:
                tok = tokenizer_from_files(tokenizer_files)
            else:
                raise ValueError(f"no tokenizer to tokenise {data}: the model has no tokenizer files; pass --tokenizer")
            path = str(Path(tmp) / "data")
            prepare_dataset(read_documents(data, text_field=text_field), DocumentEncoder.create(tok), path, split=split)
        cfg = DataConfig(path=path, split=split, seq_len=seq_len, batch_size=batch_size, shuffle=False,
                         num_epochs=1, drop_remainder=False, packing="first_fit")
        batches, n = [], 0
        for batch in make_iterator(cfg):
            batches.append({k: np.asarray(v) for k, v in batch.items()})
            n += int(np.asarray(batch["loss_mask"]).sum())
            if max_tokens and n >= max_tokens:
                break
    return batches
