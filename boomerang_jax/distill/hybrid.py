"""Patch-aware distillation's hybrids: the student with some blocks swapped for their frozen teacher blocks,
built inside the jitted step by gathers (the patched set is data, so one program serves every set of a size),
and the schedule that draws which blocks each step patches (docs/METHOD.md, section 5)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Params, head_kernel
from boomerang_jax.surgery import LayerPlan, hybrid_index, patched_first

Hybrid = dict[str, jax.Array]  # surgery.HybridIndex as arrays: layers, hidden, teacher_embedding, teacher_head


def hybrid_arrays(plan: LayerPlan, patched: Any) -> Hybrid:
    """The gather indices of the student with `patched` blocks replaced by their teacher blocks."""
    return dataclasses.asdict(hybrid_index(plan, patched))


def hybrid_model(student_params: Params, teacher_params: Params, hybrid: Hybrid, *, student_config: ModelConfig,
                 teacher_config: ModelConfig) -> tuple[Params, ModelConfig, jax.Array]:
    """(params, config, LM head) of the interpolated model `hybrid` describes, built by gathers so that the
    patched set is data, not structure. The teacher's parts are frozen (no gradient); the result's layers are in
    the student's dtype. Matches `surgery.interpolate` (tested)."""
    frozen = jax.lax.stop_gradient(teacher_params)
    idx = hybrid["layers"]
    m = jax.tree.leaves(student_params["layers"])[0].shape[0]
    from_teacher = idx >= m

    def gather(s: jax.Array, t: jax.Array) -> jax.Array:  # each stack gathered at hybrid size, then selected
        t_rows = t[jnp.clip(idx - m, 0, t.shape[0] - 1)].astype(s.dtype)
        s_rows = s[jnp.clip(idx, 0, m - 1)]
        return jnp.where(from_teacher.reshape((-1,) + (1,) * (s.ndim - 1)), t_rows, s_rows)

    layers = jax.tree.map(gather, student_params["layers"], frozen["layers"])
    pick = lambda flag, t, s: jnp.where(flag, t.astype(s.dtype), s)  # noqa: E731
    embedding = pick(hybrid["teacher_embedding"], frozen["embed"]["embedding"], student_params["embed"]["embedding"])
    final_norm = jax.tree.map(lambda t, s: pick(hybrid["teacher_head"], t, s), frozen["final_norm"],
                              student_params["final_norm"])
    head = pick(hybrid["teacher_head"], head_kernel(frozen, teacher_config), head_kernel(student_params, student_config))
    params = {"embed": {"embedding": embedding}, "final_norm": final_norm, "layers": layers}
    # logits are never asked of this forward (the loss uses `head`), so the config stays tied: no lm_head needed
    config = student_config.replace(num_layers=int(hybrid["layers"].shape[0]), tie_word_embeddings=True)
    return params, config, head


def check_patch_sizes(plan: LayerPlan, sizes: tuple[int, ...]) -> None:
    """Raise ValueError naming the first entry of `sizes` that `plan` cannot draw (0 = the plain student)."""
    n = len(plan.multi_layer_blocks)
    for m in sizes:
        if m and not 0 < m < n:
            raise ValueError(f"train.patch_sizes entry {m}: a hybrid patches 1..{n - 1} of the plan's "
                             f"{n} multi-layer blocks (0 = the plain student)")


def patch_schedule(plan: LayerPlan, sizes: tuple[int, ...], seed: int, step: int) -> frozenset[int] | None:
    """The blocks patched at training step `step` (0-based) of patch-aware distillation: `sizes[step % len]`
    multi-layer blocks drawn uniformly (fixed by seed and step, so a resumed run draws the same), closed the way
    a family closes them (`surgery.patched_first`). None (the plain student) when that size is 0 or sizes is
    empty."""
    m = sizes[step % len(sizes)] if sizes else 0
    if m == 0:
        return None
    check_patch_sizes(plan, (m,))
    multi = plan.multi_layer_blocks
    rng = np.random.default_rng([seed, step])
    return patched_first(plan, [multi[i] for i in rng.choice(len(multi), size=m, replace=False)])
