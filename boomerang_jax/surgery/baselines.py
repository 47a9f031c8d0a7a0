"""Training-free layer-dropping baseline: ShortGPT's block influence (Men et al., 2024).

Block influence of layer i = 1 - mean over real tokens of cos(input of layer i, output of layer i) on
calibration text. Layers whose output is most similar to their input change the residual stream least,
so they are dropped first. (The other baseline, naive pruning, is `surgery.prune` without distillation.)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Params, forward


@functools.partial(jax.jit, static_argnames=("config",))
def _cosine_sums(params: Params, config: ModelConfig, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    n = config.num_layers
    # HF indices 0..n-1 are the inputs of layers 0..n-1; index n is after the final norm, so the last
    # layer's raw output comes from `last_layer_output`.
    out = forward(params, config, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                  hidden_indices=tuple(range(n)), return_logits=False)
    hs = jnp.stack(out.hidden_states + (out.last_layer_output,)).astype(jnp.float32)  # [n+1, B, T, D]
    a, b = hs[:-1], hs[1:]
    cos = jnp.sum(a * b, -1) / (jnp.maximum(jnp.linalg.norm(a, axis=-1), 1e-8) *
                                jnp.maximum(jnp.linalg.norm(b, axis=-1), 1e-8))
    mask = (batch["segment_ids"] > 0).astype(jnp.float32)
    return jnp.sum(cos * mask, axis=(1, 2)), jnp.sum(mask)


def block_influence(params: Params, config: ModelConfig, batches: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray:
    """Per-layer block influence [num_layers] (higher = more important) on calibration batches."""
    total, count = np.zeros(config.num_layers), 0.0
    for batch in batches:
        s, n = _cosine_sums(params, config, {k: jnp.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions")})
        total += np.asarray(s, np.float64)
        count += float(n)
    if count == 0:
        raise ValueError("no calibration tokens")
    return 1.0 - total / count


def layers_to_drop(influence: np.ndarray, num_drop: int) -> list[int]:
    """The `num_drop` layers of lowest block influence (ties broken towards later layers), sorted."""
    if not 0 <= num_drop < len(influence):
        raise ValueError(f"cannot drop {num_drop} of {len(influence)} layers")
    order = sorted(range(len(influence)), key=lambda i: (influence[i], -i))
    return sorted(order[:num_drop])


def drop_layers(params: Params, config: ModelConfig, drop: Sequence[int]) -> tuple[ModelConfig, Params]:
    """A copy of the model without the given layers (embedding, final norm and head unchanged)."""
    keep = [i for i in range(config.num_layers) if i not in set(drop)]
    bad = [i for i in drop if not 0 <= i < config.num_layers]
    if bad or not keep:
        raise ValueError(f"invalid layers to drop {list(drop)} for a {config.num_layers}-layer model")
    idx = np.asarray(keep)
    new = dict(params)
    new["layers"] = jax.tree.map(lambda x: x[idx], params["layers"])
    return config.replace(num_layers=len(keep)), new


def shortgpt_family(params: Params, config: ModelConfig, influence: np.ndarray,
                    sizes: Iterable[int]) -> list[tuple[list[int], tuple[ModelConfig, Params]]]:
    """For each target layer count, the dropped layers and the model without them."""
    out: list[tuple[list[int], Any]] = []
    for n in sizes:
        drop = layers_to_drop(influence, config.num_layers - n)
        out.append((drop, drop_layers(params, config, drop)))
    return out
