"""Text generation with a key/value cache: greedy (sanity checks) and sampling (teacher-written training text).

One jitted program per (batch, prompt length, new tokens, temperature): the prompt is run once to fill the
cache, then a `lax.scan` appends one token per step, so generation costs one token's forward per new token.
The cache is the scan's carry and is updated in place (see `Transformer._decode`).

Sampling draws two uniforms per row and step and inverts the distribution's CDF in two levels (blocks of the
vocabulary, then a token within the block): exactly softmax(logits / temperature) up to float32 rounding, at
the cost of a softmax. (Gumbel-max, `jax.random.categorical`, needs one random number per vocabulary entry:
on a CPU, generating those cost a third of a decoding step.) Each row has its own key, so a row's tokens do
not depend on which other rows share its batch.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Params, forward, init_cache

_BLOCK = 128  # vocabulary entries per block of the two-level inverse CDF
_WINDOW = 32  # decoding steps per chunk: the cache grows by this many slots between chunks


def _pick(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Index i [B] with cumsum(weights)[i - 1] <= u * total < cumsum(weights)[i], for weights [B, N] >= 0 and
    u [B] in [0, 1): index i has probability weights[i] / total. Rounding never yields an index of zero weight."""
    cdf = jnp.cumsum(weights, axis=-1)
    i = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1)
    n = weights.shape[-1]
    last = n - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)  # the last index of positive weight
    return jnp.minimum(i, last).astype(jnp.int32)


def sample_logits(logits: jax.Array, u: jax.Array, temperature: float) -> jax.Array:
    """Tokens [B] drawn from softmax(logits / temperature) ([B, V] logits) by inverting the CDF with the two
    uniforms u [B, 2] in [0, 1): the first picks a block of `_BLOCK` vocabulary entries by its mass, the second
    a token within it (float32 sums of at most V / _BLOCK and _BLOCK terms, so rounding stays far below the
    sampling noise of any realistic number of draws)."""
    b, v = logits.shape
    z = logits.astype(jnp.float32) / temperature
    w = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))  # unnormalised; the most likely token has weight 1
    blocks = -(-v // _BLOCK)
    w = jnp.pad(w, ((0, 0), (0, blocks * _BLOCK - v))).reshape(b, blocks, _BLOCK)
    blk = _pick(jnp.sum(w, axis=-1), u[:, 0])
    within = jnp.take_along_axis(w, blk[:, None, None], axis=1)[:, 0]
    return blk * _BLOCK + _pick(within, u[:, 1])


def _next(logits: jax.Array, keys: jax.Array, step: jax.Array, temperature: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), (2,)))(keys)
    return sample_logits(logits, u, temperature)


def matmul_operands(params: Params, dtype: Any) -> Params:
    """`params` with every matmul operand (kernels, embedding) already in `dtype`: the cast every layer's matmul
    makes anyway (models/matmul.py), done once for a whole decoding loop instead of at every step."""
    def cast(path: Any, x: jax.Array) -> jax.Array:
        name = getattr(path[-1], "key", "")
        return x.astype(dtype) if name in ("kernel", "embedding") and x.dtype != dtype else x
    return jax.tree_util.tree_map_with_path(cast, params)


@functools.partial(jax.jit, static_argnames=("config", "new_tokens", "temperature", "dtype"))
def _generate(params: Params, prompts: jax.Array, keys: jax.Array, *, config: ModelConfig, new_tokens: int,
              temperature: float, dtype: Any) -> jax.Array:
    batch, prompt_len = prompts.shape
    params = matmul_operands(params, dtype)
    # the prompt fills a cache of exactly its length; then the steps run in chunks of _WINDOW, and before each
    # chunk the cache grows (one copy) to what that chunk needs: every step's attention reads the slots written
    # so far plus at most _WINDOW empty ones, not the whole final cache (on a CPU, reading the cache is most of
    # a step's cost beyond the matmuls). The last new token is sampled but never fed back.
    out = forward(params, config, prompts, cache=init_cache(config, batch, prompt_len, dtype), cache_index=0,
                  dtype=dtype)
    token = _next(out.logits[:, -1], keys, jnp.int32(0), temperature)
    cache, tokens = out.cache, [token[:, None]]

    def step(carry, i):
        cache, token = carry
        nxt = forward(params, config, token[:, None], cache=cache, cache_index=prompt_len + i - 1, dtype=dtype)
        token = _next(nxt.logits[:, -1], keys, i, temperature)
        return (nxt.cache, token), token

    for start in range(1, new_tokens, _WINDOW):
        stop = min(new_tokens, start + _WINDOW)
        grow = prompt_len + stop - 1 - cache[0].shape[3]
        cache = tuple(jnp.pad(c, ((0, 0),) * 3 + ((0, grow), (0, 0))) for c in cache)
        (cache, token), chunk = jax.lax.scan(step, (cache, token), jnp.arange(start, stop, dtype=jnp.int32))
        tokens.append(chunk.T)
    return jnp.concatenate([prompts] + tokens, axis=1)


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

    temperature 0 is greedy (argmax); otherwise tokens are drawn from softmax(logits / temperature) with `key`:
    one PRNG key (split into one per row) or B keys, one per row (a row's tokens then depend only on its prompt
    and its key). Same keys, same tokens. No stop tokens: callers cut at their end-of-text id."""
    prompts = np.asarray(prompts, np.int32)
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be [batch, length >= 1] token ids, got shape {prompts.shape}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    batch = prompts.shape[0]
    if key is None:
        key = jax.random.key(0)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # a raw uint32 key (jax.random.PRNGKey)
        key = jax.random.wrap_key_data(key)
    keys = jax.random.split(key, batch) if key.ndim == 0 else key
    if keys.shape != (batch,):
        raise ValueError(f"key must be one PRNG key or one per row ({batch}), got shape {keys.shape}")
    out = _generate(params, jnp.asarray(prompts), keys, config=config, new_tokens=int(new_tokens),
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
