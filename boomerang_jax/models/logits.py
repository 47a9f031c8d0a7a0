"""Logits from final hidden states, one sequence chunk at a time: the math shared by the distillation loss
(distill.loss), perplexity (eval.perplexity) and the KL patch order (surgery.orders).

Logits are `hidden @ head` with the head cast to the hidden states' dtype (e.g. bf16) and float32 accumulation
and result; everything after (log-softmax, NLL, KL) is float32. A sequence of length T is cut into chunks of
`min(chunk, T)` tokens, zero-padded to a whole number of chunks, and scanned with remat, so no [B, T, V] tensor
ever exists, forward or backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from boomerang_jax.models.matmul import mixed_dot




def chunk_layout(t: int, chunk: int) -> tuple[int, int, int]:
    """(effective chunk, number of chunks, padding) for a sequence of length t."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    c = min(chunk, t)
    n = -(-t // c)
    return c, n, n * c - t


def to_chunks(x: jax.Array, c: int, n: int, pad: int) -> jax.Array:
    """[B, T, ...] -> [n, B, c, ...], zero-padding T up to n * c."""
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    b = x.shape[0]
    x = x.reshape((b, n, c) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def from_chunks(x: jax.Array, t: int) -> jax.Array:
    """[n, B, c] -> [B, T] (drops the padding)."""
    n, b, c = x.shape
    return jnp.swapaxes(x, 0, 1).reshape(b, n * c)[:, :t]


def chunk_logits(hidden: jax.Array, head_f32: jax.Array) -> jax.Array:
    """hidden [B, c, D] @ head [D, V] in hidden's dtype, float32 result [B, c, V]."""
    return mixed_dot(hidden, head_f32, hidden.dtype)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood [B, c] from float32 logits [B, c, V]."""
    v = logits.shape[-1]
    tgt = jnp.clip(targets, 0, v - 1).astype(jnp.int32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    return lse - picked


def check_shapes(final: jax.Array, head: jax.Array, name: str) -> None:
    if final.ndim != 3 or head.ndim != 2 or final.shape[-1] != head.shape[0]:
        raise ValueError(
            f"{name}: expected final [B, T, D] and head [D, V], got "
            f"{final.shape} and {head.shape}"
        )


def chunked_token_nll(
    final: jax.Array, head: jax.Array, targets: jax.Array, chunk: int = 512
) -> jax.Array:
    """Per-token NLL [B, T] (float32) of ``targets`` under ``final @ head``, chunked.

    For perplexity/evaluation: never builds [B, T, V] logits. ``final`` is the
    post-final-norm hidden state [B, T, D], ``head`` the LM head [D, V],
    ``targets`` [B, T] the next token at each position (out-of-range ids are
    clipped; mask them out yourself).
    """
    check_shapes(final, head, "chunked_token_nll")
    b, t, _ = final.shape
    c, n, pad = chunk_layout(t, chunk)
    head_f32 = head.astype(jnp.float32)

    @jax.checkpoint
    def body(carry, xs):
        h, tgt = xs
        return carry, token_nll(chunk_logits(h, head_f32), tgt)

    xs = (to_chunks(final, c, n, pad), to_chunks(targets, c, n, pad))
    _, nll = jax.lax.scan(body, None, xs)
    return from_chunks(nll, t)


def chunked_ce_kl(
    student_final: jax.Array,
    student_head: jax.Array,
    teacher_final: jax.Array | None,
    teacher_head: jax.Array | None,
    targets: jax.Array,
    mask: jax.Array,
    *,
    chunk: int,
    tau: float,
    use_ce: bool,
    use_kl: bool,
) -> tuple[jax.Array, jax.Array]:
    """Masked sums of CE (of `targets`) and KL(teacher || student) over all tokens, scanning sequence chunks with
    remat: never a [B, T, V] tensor. Used by the distillation loss and by the KL patch order (surgery/orders)."""
    b, t, _ = student_final.shape
    c, n, pad = chunk_layout(t, chunk)
    s_head = student_head.astype(jnp.float32)
    if use_kl:
        t_head = jax.lax.stop_gradient(teacher_head).astype(jnp.float32)
        t_final = jax.lax.stop_gradient(teacher_final)

    def body(carry, xs):
        ce_acc, kl_acc = carry
        hs, ht, tgt, m = xs
        keep = m != 0
        zs = chunk_logits(hs, s_head)
        if use_ce:
            nll = token_nll(zs, tgt)
            ce_acc = ce_acc + jnp.sum(jnp.where(keep, m * nll, 0.0))
        if use_kl:
            zt = jax.lax.stop_gradient(chunk_logits(ht, t_head))
            log_pt = jax.nn.log_softmax(zt / tau, axis=-1)
            zs_tau = zs / tau
            # KL = sum_v p_T (log p_T - z_S/tau) + logsumexp(z_S/tau), using
            # sum_v p_T = 1: no normalised student tensor is kept for backward.
            kl_tok = jnp.sum(jnp.exp(log_pt) * (log_pt - zs_tau), axis=-1)
            kl_tok = kl_tok + jax.nn.logsumexp(zs_tau, axis=-1)
            kl_acc = kl_acc + jnp.sum(jnp.where(keep, m * kl_tok, 0.0))
        return (ce_acc, kl_acc), None

    # prevent_cse=False is safe (and faster) inside scan, per the jax.checkpoint docs.
    body = jax.checkpoint(body, prevent_cse=False)
    xs = (
        to_chunks(student_final, c, n, pad),
        to_chunks(t_final, c, n, pad) if use_kl else None,
        to_chunks(targets, c, n, pad),
        to_chunks(mask, c, n, pad),
    )
    zero = jnp.zeros((), jnp.float32)
    (ce_sum, kl_sum), _ = jax.lax.scan(body, (zero, zero), xs)
    return ce_sum, kl_sum
