"""Text generation with a key/value cache: greedy (sanity checks) and sampling (teacher-written training text).

One jitted program per (batch, prompt length, new tokens, temperature): the prompt is run once to fill the
cache, then a `lax.scan` appends one token per step, so generation costs one token's forward per new token.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Params, forward, init_cache


@functools.partial(jax.jit, static_argnames=("config", "new_tokens", "temperature", "dtype"))
def _generate(params: Params, prompts: jax.Array, key: jax.Array, *, config: ModelConfig, new_tokens: int,
              temperature: float, dtype: Any) -> jax.Array:
    batch, prompt_len = prompts.shape
    total = prompt_len + new_tokens
    out = forward(params, config, prompts, cache=init_cache(config, batch, total, dtype), cache_index=0, dtype=dtype)

    def step(carry, i):
        cache, logits, key = carry
        key, sub = jax.random.split(key)
        logits = logits.astype(jnp.float32)
        if temperature == 0.0:
            token = jnp.argmax(logits, axis=-1)
        else:
            token = jax.random.categorical(sub, logits / temperature, axis=-1)
        token = token.astype(jnp.int32)
        nxt = forward(params, config, token[:, None], cache=cache, cache_index=prompt_len + i, dtype=dtype)
        return (nxt.cache, nxt.logits[:, -1], key), token

    _, tokens = jax.lax.scan(step, (out.cache, out.logits[:, -1], key), jnp.arange(new_tokens))
    return jnp.concatenate([prompts, tokens.T], axis=1)


def generate(
    params: Params,
    config: ModelConfig,
    prompts: np.ndarray,
    new_tokens: int,
    *,
    temperature: float = 1.0,
    key: jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> np.ndarray:
    """Prompts [B, P] (same length) followed by `new_tokens` tokens each: [B, P + new_tokens] int32.

    temperature 0 is greedy (argmax); otherwise tokens are drawn from softmax(logits / temperature) with `key`
    (same key, same tokens). No stop tokens: callers cut at their end-of-text id."""
    prompts = np.asarray(prompts, np.int32)
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be [batch, length >= 1] token ids, got shape {prompts.shape}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    if key is None:
        key = jax.random.key(0)
    out = _generate(params, jnp.asarray(prompts), key, config=config, new_tokens=int(new_tokens),
                    temperature=float(temperature), dtype=jnp.dtype(dtype))
    return np.asarray(out)


def greedy_generate(
    params: Params,
    config: ModelConfig,
    prompt: list[int],
    max_new_tokens: int = 24,
    *,
    stop_ids: tuple[int, ...] = (),
    dtype: Any = jnp.float32,
) -> list[int]:
    """`prompt` plus up to `max_new_tokens` argmax tokens, cut after the first of `stop_ids`."""
    out = generate(params, config, np.asarray([prompt]), max_new_tokens, temperature=0.0, dtype=dtype)[0].tolist()
    for pos in range(len(prompt), len(out)):
        if out[pos] in stop_ids:
            return out[: pos + 1]
    return out
