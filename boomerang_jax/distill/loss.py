"""Boomerang distillation loss (docs/METHOD.md, section 2), chunked over the sequence.

    L = w_ce * CE(z_S, targets)
      + w_kl * tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau))
      + sum_p (w_cos / P) * (1 - cos(h_S[p], h_T[p]))

All terms are averaged over real tokens only (``loss_mask``). Logits are never
materialised for the whole batch: they are formed from the final hidden states
and the LM head one sequence chunk at a time inside a ``lax.scan`` whose body is
wrapped in ``jax.checkpoint``, so forward and backward peak memory of the loss
is O(B x chunk x V) instead of O(B x T x V).

Numerics:
- Logits: ``hidden @ head`` with the head cast to the hidden states' dtype (the
  compute dtype, e.g. bf16) and ``preferred_element_type=float32``, i.e. bf16
  operands with float32 accumulation and a float32 result. Everything after
  (log-softmax, CE, KL, cosine) is float32.
- The head enters the scan as float32, so the head gradient is accumulated
  over chunks in float32 (cast back to the head's dtype once, at the end).
- Sequence length: T need not be a multiple of ``chunk``. The effective chunk
  is ``min(chunk, T)`` and T is zero-padded up to a multiple of it with mask 0.
- Teacher inputs get ``stop_gradient``: the teacher never receives gradient.
- ``loss_mask`` may be bool or float; non-zero entries count, weighted by their
  value (1 for an ordinary token). Masked positions are excluded with
  ``jnp.where``, so any finite value there (logits, hidden, targets, even
  out-of-range target ids) affects neither the loss nor its gradient.
- A term with weight 0 is skipped (not computed) and reports 0 in metrics; with
  ``w_kl == 0`` the teacher's final states and head may be ``None``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from boomerang_jax.models.logits import check_shapes, chunked_ce_kl

_COS_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the distillation loss terms and the sequence chunk size."""

    w_ce: float = 1.0
    w_kl: float = 0.1
    tau: float = 1.0
    w_cos: float = 2.0
    chunk: int = 512

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"loss.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("w_ce", "w_kl", "w_cos", "tau"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, "a number >= 0")
        if self.tau <= 0:
            raise bad("tau", "a number > 0 (the KL temperature)")
        if self.w_ce == self.w_kl == self.w_cos == 0:
            raise ValueError("loss.w_ce, loss.w_kl and loss.w_cos are all 0: nothing would be trained")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk <= 0:
            raise bad("chunk", "an integer > 0 (tokens per logits chunk)")


# ----------------------------------------------------------------------------- public API


def cosine_distance(
    student: jax.Array, teacher: jax.Array, loss_mask: jax.Array
) -> jax.Array:
    """Masked mean over tokens of 1 - cos(student, teacher) over the hidden dim (f32).

    Each vector's norm is clamped at 1e-8, so zero vectors give distance 1 and a
    finite gradient. Teacher gets ``stop_gradient``.
    """
    s = student.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher).astype(jnp.float32)
    s_norm = jnp.sqrt(jnp.maximum(jnp.sum(s * s, axis=-1), _COS_EPS**2))
    t_norm = jnp.sqrt(jnp.maximum(jnp.sum(t * t, axis=-1), _COS_EPS**2))
    cos = jnp.sum(s * t, axis=-1) / (s_norm * t_norm)
    m = loss_mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(m != 0, m * (1.0 - cos), 0.0))
    return total / jnp.maximum(jnp.sum(m), 1.0)


def distill_loss(
    cfg: LossConfig,
    *,
    student_final: jax.Array,
    student_head: jax.Array,
    teacher_final: jax.Array | None = None,
    teacher_head: jax.Array | None = None,
    targets: jax.Array,
    loss_mask: jax.Array,
    student_hidden: Sequence[jax.Array] = (),
    teacher_hidden: Sequence[jax.Array] = (),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Boomerang distillation loss, masked to real tokens, memory O(B x chunk x V).

    Args:
      cfg: term weights, temperature and sequence chunk size (static).
      student_final / teacher_final: [B, T, D] hidden states after the final norm
        (compute dtype). ``teacher_*`` may be None when ``cfg.w_kl == 0``.
      student_head / teacher_head: LM heads [D, V] (any float dtype; cast to the
        final states' dtype for the matmul).
      targets: [B, T] int, the next token at each position.
      loss_mask: [B, T] bool/float, non-zero = token counts (weighted by value).
      student_hidden / teacher_hidden: aligned hidden-state pairs, element i of
        one paired with element i of the other, each [B, T, D'].

    Returns:
      (total loss scalar f32, metrics). Metrics: "loss"; "ce" (mean CE); "kl"
      (mean KL at temperature tau, before the w_kl * tau^2 factor); "cos" (sum of
      the weighted cosine terms, as added to the loss); "cos_{i}" (unweighted
      mean cosine distance 1 - cos of pair i); "tokens" (sum of loss_mask).
      So loss = w_ce * ce + w_kl * tau^2 * kl + cos. Skipped terms report 0.
    """
    check_shapes(student_final, student_head, "student")
    b, t, _ = student_final.shape
    v = student_head.shape[1]
    if targets.shape != (b, t) or loss_mask.shape != (b, t):
        raise ValueError(
            f"targets {targets.shape} and loss_mask {loss_mask.shape} must be {(b, t)}"
        )
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"{len(student_hidden)} student hidden states vs "
            f"{len(teacher_hidden)} teacher hidden states: they must pair up"
        )
    use_ce = cfg.w_ce != 0
    use_kl = cfg.w_kl != 0
    use_cos = cfg.w_cos != 0 and len(student_hidden) > 0
    if use_kl:
        if teacher_final is None or teacher_head is None:
            raise ValueError("w_kl != 0 needs teacher_final and teacher_head")
        check_shapes(teacher_final, teacher_head, "teacher")
        if teacher_final.shape[:2] != (b, t) or teacher_head.shape[1] != v:
            raise ValueError(
                f"teacher final {teacher_final.shape} / head {teacher_head.shape} do "
                f"not match student batch/seq {(b, t)} and vocab {v}"
            )
        if cfg.tau <= 0:
            raise ValueError(f"tau must be positive, got {cfg.tau}")

    mask = loss_mask.astype(jnp.float32)
    tokens = jnp.sum(mask)
    denom = jnp.maximum(tokens, 1.0)
    zero = jnp.zeros((), jnp.float32)
    ce = kl = cos_total = zero
    metrics: dict[str, jax.Array] = {}

    if use_ce or use_kl:
        ce_sum, kl_sum = chunked_ce_kl(
            student_final,
            student_head,
            teacher_final,
            teacher_head,
            targets,
            mask,
            chunk=cfg.chunk,
            tau=float(cfg.tau),
            use_ce=use_ce,
            use_kl=use_kl,
        )
        ce, kl = ce_sum / denom, kl_sum / denom

    if use_cos:
        p = len(student_hidden)
        for i, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden)):
            if hs.shape != ht.shape or hs.shape[:2] != (b, t):
                raise ValueError(
                    f"hidden pair {i}: student {hs.shape} vs teacher {ht.shape}"
                )
            d = cosine_distance(hs, ht, mask)
            metrics[f"cos_{i}"] = d
            cos_total = cos_total + (cfg.w_cos / p) * d

    total = zero
    if use_ce:
        total = total + cfg.w_ce * ce
    if use_kl:
        total = total + (cfg.w_kl * cfg.tau**2) * kl
    if use_cos:
        total = total + cos_total
    metrics.update(loss=total, ce=ce, kl=kl, cos=cos_total, tokens=tokens)
    return total, metrics
