"""The one matmul of the models' dense layers and LM head: operands in the compute dtype, float32 accumulation.

`mixed_dot(x, w, dtype)` is x [..., K] @ w [K, N] with both operands cast to `dtype` and a float32 result, and a
custom VJP whose two backward matmuls take the same `dtype` operands (the cotangent rounded to `dtype`) and also
accumulate in float32. That is what a TPU's MXU and a GPU's bf16 GEMM do for a bf16 model, so nothing changes
there; on CPUs with AMX or AVX512-BF16 it is the fast path: XLA's CPU backend runs bf16 x bf16 -> float32 dots
several times faster than float32 ones, but bf16 x bf16 -> bf16 dots (and the mixed float32 x bf16 dots JAX's
own transpose rule would emit for the backward pass) slower than float32 (benchmarks/matmul_dtypes.py). For a
float32 compute dtype this is a plain float32 dot, forward and backward.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp


def mixed_dot(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """x [..., K] @ w [K, N] with `dtype` operands and float32 accumulation; float32 result [..., N].

    The operands are cast before the product, so gradients reach x and w as `dtype` arrays (then, through the
    casts, their own dtypes), exactly as they do for a plain dot of cast operands."""
    dtype = jnp.dtype(dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    return _dot(x, w) if dtype == jnp.float32 else _low_precision_dot(x, w)


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _low_precision_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return _dot(x, w)


def _forward(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _dot(x, w), (x, w)


def _backward(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    gc = g.astype(x.dtype)
    dx = _dot(gc, w.T).astype(x.dtype)
    lead = tuple(range(x.ndim - 1))
    dw = jax.lax.dot_general(x, gc, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
    return dx, dw.astype(w.dtype)


_low_precision_dot.defvjp(_forward, _backward)


COMPUTE_DTYPES = ("float32", "bfloat16")


def fast_compute_dtype(min_speedup: float = 1.5, repeats: int = 5) -> tuple[str, float]:
    """The compute dtype a run on this backend should use, and the measured bf16 / float32 matmul speed ratio.

    Accelerators: bfloat16 (ratio 0.0: not measured). CPUs: a [512, 576] @ [576, 1536] product (a small model's
    MLP at a training micro-batch) is timed both ways, median of `repeats`; bfloat16 when it is at least
    `min_speedup` times as fast (CPUs with AMX or AVX512-BF16), float32 otherwise. About half a second."""
    if jax.default_backend() != "cpu":
        return "bfloat16", 0.0
    x = jnp.ones((512, 576), jnp.float32)
    w = jnp.ones((576, 1536), jnp.float32)
    best = {}
    for name in COMPUTE_DTYPES:
        f = jax.jit(lambda x, w, name=name: mixed_dot(x, w, name))
        f(x, w).block_until_ready()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            f(x, w).block_until_ready()
            times.append(time.perf_counter() - t)
        best[name] = sorted(times)[len(times) // 2]
    ratio = best["float32"] / best["bfloat16"]
    return ("bfloat16" if ratio >= min_speedup else "float32"), ratio
