"""Patch orders chosen from data: which student layer to swap back for its teacher block first.

The paper patches in a fixed order (last-to-first or first-to-last). After a short distillation the student
layers are not equally good stand-ins for their blocks, and the blocks at the ends of a model often matter
most (SmolLM2: teacher layers 0, 1, 24 and 29), so a fixed order can keep a poor stand-in until the very last
step. `by_loss_order` scores every multi-layer block by the calibration loss of the TEACHER with only that
block replaced by its student layer, and patches the worst stand-ins first: the student layers that remain
longest are the ones that hurt least. This is a one-shot variant of KLPatch ("Understanding Layer Patching
in Model Size Interpolation", 2026, which re-scores greedily after every step): K forward passes instead of
about K^2 / 2. Use calibration text from the training distribution, never the evaluation text.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from boomerang_jax.surgery import LayerPlan, Model, interpolate, patch_sequence

BY_LOSS = "by-loss"


def block_scores(student: Any, teacher: Any, plan: LayerPlan, batches: Iterable[Mapping[str, np.ndarray]], *,
                 chunk: int = 256, log: Callable[[str], None] | None = None) -> dict[int, float]:
    """Mean next-token NLL (nats) of the teacher with ONE multi-layer block replaced by its student layer,
    for every multi-layer block (student layer id -> NLL). `student`, `teacher`: (config, params) pairs."""
    from boomerang_jax.eval.perplexity import perplexity

    batches = list(batches)
    if not batches:
        raise ValueError("block_scores needs at least one calibration batch")
    every = frozenset(range(plan.num_student_layers))
    scores = {}
    for i in patch_sequence(plan, "first-to-last"):
        t0 = time.perf_counter()
        model: Model = interpolate(student, teacher, plan, every - {i})
        scores[i] = perplexity(model.params, model.config, batches, chunk=chunk).nll
        if log:
            log(f"block {i} (teacher layers {list(plan.blocks[i])}) as the only student layer: "
                f"calibration NLL {scores[i]:.4f} ({time.perf_counter() - t0:.1f}s)")
    return scores


def by_loss_order(scores: Mapping[int, float]) -> tuple[int, ...]:
    """Blocks in patch order: the highest loss (the worst stand-in) first; ties by block id."""
    return tuple(sorted(scores, key=lambda i: (-scores[i], i)))
