"""Greedy generation for quick sanity checks (demo, README): fixed-length buffer, one compile, no KV cache."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Params, forward


def greedy_generate(
    params: Params,
    config: ModelConfig,
    prompt: list[int],
    max_new_tokens: int = 24,
    *,
    stop_ids: tuple[int, ...] = (),
    dtype: Any = jnp.float32,
) -> list[int]:
    """Append up to `max_new_tokens` argmax tokens to `prompt`, stopping at any of `stop_ids`.

    Recomputes the whole (right-padded) buffer each step: O(n^2) but compiled once, fine for short demos.
    """
    total = len(prompt) + max_new_tokens
    buf = np.zeros((1, total), np.int32)
    buf[0, : len(prompt)] = prompt

    @jax.jit
    def next_token(p: Params, tokens: jax.Array, pos: jax.Array) -> jax.Array:
        logits = forward(p, config, tokens, dtype=dtype).logits[0]
        return jnp.argmax(logits[pos - 1])

    out = list(prompt)
    for pos in range(len(prompt), total):
        tok = int(next_token(params, jnp.asarray(buf), pos))
        buf[0, pos] = tok
        out.append(tok)
        if tok in stop_ids:
            break
    return out
