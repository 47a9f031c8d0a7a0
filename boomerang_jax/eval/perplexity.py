"""Perplexity of a model on packed batches: token-weighted, jitted, never a full [B, T, V] logits tensor.

Batches follow the data contract (boomerang_jax/data): `tokens`, `targets`, `segment_ids`, `positions`,
`loss_mask` arrays [B, T]. The uncertainty is a bootstrap over evaluation rows (fixed seed), so a user can
tell a real difference between two sizes from noise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.distill.loss import chunked_token_nll
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Params, forward, head_kernel


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per token (nats)
    tokens: int
    rows: int
    ci_low: float  # 95% bootstrap interval of the perplexity, over rows
    ci_high: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.3f} (95% CI {self.ci_low:.3f}-{self.ci_high:.3f}) "
                f"over {self.tokens} tokens in {self.rows} rows")


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
        s, n = row_nll(params, config, {k: jnp.asarray(batch[k]) for k in
                                        ("tokens", "targets", "segment_ids", "positions", "loss_mask")},
                       chunk=chunk, dtype=dtype)
        sums.append(np.asarray(s, np.float64))
        counts.append(np.asarray(n, np.float64))
    if not sums:
        raise ValueError("no evaluation batches")
    return np.concatenate(sums), np.concatenate(counts)


def summarise(sums: np.ndarray, counts: np.ndarray, *, bootstrap: int = 1000, seed: int = 0) -> PerplexityResult:
    """Token-weighted perplexity with a bootstrap-over-rows 95% interval."""
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    total = counts.sum()
    if total == 0:
        raise ValueError("no evaluation tokens (every loss_mask entry is 0)")
    nll = float(sums.sum() / total)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), (bootstrap, len(sums)))
    boot = sums[idx].sum(1) / np.maximum(counts[idx].sum(1), 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=int(total), rows=int(len(sums)),
                            ci_low=math.exp(lo), ci_high=math.exp(hi))


def perplexity(params: Params, config: ModelConfig, batches: Iterable[Mapping[str, np.ndarray]], *,
               chunk: int = 256, dtype: Any = jnp.float32, bootstrap: int = 1000, seed: int = 0) -> PerplexityResult:
    """Token-weighted perplexity of a model over batches (next-token prediction within each document)."""
    sums, counts = row_stats(params, config, batches, chunk=chunk, dtype=dtype)
    return summarise(sums, counts, bootstrap=bootstrap, seed=seed)
