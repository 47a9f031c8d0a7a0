"""Next-token NLL of a model on packed batches, per row: what perplexity (eval), the by-loss patch order
(surgery.orders) and the compiled teacher forward (pod.aot) compute. Jitted; never a [B, T, V] logits tensor.

Batches follow the data contract: `tokens`, `targets`, `segment_ids`, `positions`, `loss_mask` arrays [B, T].
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.models.batch import BATCH_KEYS
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.logits import chunked_token_nll
from boomerang_jax.models.transformer import Params, forward, head_kernel


@functools.partial(jax.jit, static_argnames=("config", "chunk", "dtype", "rows_sharding"))
def row_nll(params: Params, config: ModelConfig, batch: Mapping[str, jax.Array], chunk: int = 256,
            dtype: Any = jnp.float32, rows_sharding: Any = None) -> tuple[jax.Array, jax.Array]:
    """Per-row (sum of masked NLL, number of masked tokens), both float32 [B].

    On a mesh pass `rows_sharding` (a NamedSharding of [B, T, hidden] with rows over the batch axes): the final
    hidden states then stay split by row, so each device computes logits for its own rows only. Without it XLA
    may split the LM head's contraction instead and hold every row's logits chunk on each device (seen compiling
    Qwen3 for v5e-256: 74.5 GiB per chip)."""
    out = forward(params, config, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                  return_logits=False, dtype=dtype)
    hidden = out.final_hidden
    if rows_sharding is not None:
        hidden = jax.lax.with_sharding_constraint(hidden, rows_sharding)
    nll = chunked_token_nll(hidden, head_kernel(params, config).astype(dtype), batch["targets"], chunk)
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask, axis=-1), jnp.sum(mask, axis=-1)


def row_stats(params: Params, config: ModelConfig, batches: Iterable[Mapping[str, np.ndarray]], *,
              chunk: int = 256, dtype: Any = jnp.float32) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated per-row NLL sums and token counts over all batches."""
    sums, counts = [], []
    for batch in batches:
        s, n = row_nll(params, config, {k: jnp.asarray(batch[k]) for k in BATCH_KEYS},
                       chunk=chunk, dtype=dtype)
        sums.append(np.asarray(s, np.float64))
        counts.append(np.asarray(n, np.float64))
    if not sums:
        raise ValueError("no evaluation batches")
    return np.concatenate(sums), np.concatenate(counts)


def mean_nll(params: Params, config: ModelConfig, batches: Iterable[Mapping[str, np.ndarray]], *,
             chunk: int = 256, dtype: Any = jnp.float32) -> float:
    """Token-weighted mean next-token NLL (nats) over all batches."""
    sums, counts = row_stats(params, config, batches, chunk=chunk, dtype=dtype)
    if counts.sum() == 0:
        raise ValueError("no evaluation tokens (every loss_mask entry is 0)")
    return float(sums.sum() / counts.sum())
