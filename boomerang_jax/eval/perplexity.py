"""Perplexity of a model on packed batches: token-weighted, jitted, never a full [B, T, V] logits tensor.

Batches follow the data contract (boomerang_jax/data): `tokens`, `targets`, `segment_ids`, `positions`,
`loss_mask` arrays [B, T]. The uncertainty is a bootstrap over evaluation rows (fixed seed), so a user can
tell a real difference between two sizes from noise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.nll import row_stats
from boomerang_jax.models.transformer import Params


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
