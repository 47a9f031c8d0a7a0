"""Perplexity of a model on packed batches: token-weighted, jitted, never a full [B, T, V] logits tensor.

Batches follow the data contract (boomerang_jax/data): `tokens`, `targets`, `segment_ids`, `positions`,
`loss_mask` arrays [B, T]. The uncertainty is a bootstrap over evaluation rows (fixed seed), so a user can
tell a real difference between two sizes from noise. Two models evaluated on the SAME rows are compared with a
paired bootstrap (`paired_bootstrap`): both are resampled with the same row indices, so what the rows share
(hard rows are hard for every model) cancels, and the interval is that of the difference itself.
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


def perplexity_rows(params: Params, config: ModelConfig, batches: Iterable[Mapping[str, np.ndarray]], *,
                    chunk: int = 256, dtype: Any = jnp.float32, bootstrap: int = 1000, seed: int = 0
                    ) -> tuple[PerplexityResult, np.ndarray, np.ndarray]:
    """`perplexity`, plus the per-row NLL sums (nats) and token counts of the rows holding tokens: what a later
    paired comparison with another model on the same batches needs (`paired_bootstrap`)."""
    sums, counts = row_stats(params, config, batches, chunk=chunk, dtype=dtype)
    keep = counts > 0
    return summarise(sums, counts, bootstrap=bootstrap, seed=seed), sums[keep], counts[keep]


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Model A minus model B on the same rows: the token-weighted mean NLL difference (nats per token, = the
    difference of log-perplexities) with its paired 95% bootstrap interval."""

    diff: float
    ci_low: float
    ci_high: float
    rows: int
    tokens: int

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0

    @property
    def ratio(self) -> float:
        """perplexity(A) / perplexity(B)."""
        return math.exp(self.diff)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "significant": self.significant, "ratio": self.ratio}


def paired_bootstrap(sums_a: Any, counts_a: Any, sums_b: Any, counts_b: Any, *, bootstrap: int = 1000,
                     seed: int = 0) -> PairedDifference:
    """Paired bootstrap of the mean-NLL difference A - B over rows: each resample draws row indices once and
    uses them for both models, diff = (sum_A[idx] - sum_B[idx]) / tokens[idx]. The rows must be the same
    (equal token counts row by row)."""
    sa, sb = np.asarray(sums_a, np.float64), np.asarray(sums_b, np.float64)
    ca, cb = np.asarray(counts_a, np.float64), np.asarray(counts_b, np.float64)
    if not (sa.shape == sb.shape == ca.shape == cb.shape) or sa.ndim != 1:
        raise ValueError(f"paired rows need equal 1-d shapes, got {sa.shape}, {ca.shape}, {sb.shape}, {cb.shape}")
    if not np.array_equal(ca, cb):
        raise ValueError("paired rows differ in token counts: the two models were not evaluated on the same rows")
    total = ca.sum()
    if total == 0:
        raise ValueError("no evaluation tokens in the paired rows")
    d = sa - sb
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), (bootstrap, len(d)))
    boot = d[idx].sum(1) / np.maximum(ca[idx].sum(1), 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return PairedDifference(diff=float(d.sum() / total), ci_low=float(lo), ci_high=float(hi), rows=int(len(d)),
                            tokens=int(total))
