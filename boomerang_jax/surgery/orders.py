"""Patch orders chosen from data: which student layer to swap back for its teacher block first.

`kl_greedy_order` (the demo's default, `kl-greedy`) is KLPatch ("Understanding Layer Patching in Model Size
Interpolation", 2026): starting from the student, patch at each step the block whose patching brings the model
closest to the teacher, measured by KL(teacher || model) per token on calibration text (K(K+1)/2 - 1 scored
models). Each step is chosen given the blocks already patched; a one-shot score ranks every block once, in
the context of the whole teacher, and after a short distillation that ranks well only near the teacher
(measurements in docs/DECISIONS.md).

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

import functools
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.models.batch import BATCH_KEYS
from boomerang_jax.models.logits import chunked_ce_kl
from boomerang_jax.models.nll import mean_nll
from boomerang_jax.models.transformer import forward, head_kernel
from boomerang_jax.surgery import LayerPlan, Model, interpolate, patch_sequence, patched_first

BY_LOSS = "by-loss"
KL_GREEDY = "kl-greedy"
DATA_ORDERS = (KL_GREEDY, BY_LOSS)  # orders chosen from calibration text


def block_scores(student: Any, teacher: Any, plan: LayerPlan, batches: Iterable[Mapping[str, np.ndarray]], *,
                 chunk: int = 256, log: Callable[[str], None] | None = None) -> dict[int, float]:
    """Mean next-token NLL (nats) of the teacher with ONE multi-layer block replaced by its student layer,
    for every multi-layer block (student layer id -> NLL). `student`, `teacher`: (config, params) pairs."""
    batches = list(batches)
    if not batches:
        raise ValueError("block_scores needs at least one calibration batch")
    every = frozenset(range(plan.num_student_layers))
    scores = {}
    for i in patch_sequence(plan, "first-to-last"):
        t0 = time.perf_counter()
        model: Model = interpolate(student, teacher, plan, every - {i})
        scores[i] = mean_nll(model.params, model.config, batches, chunk=chunk)
        if log:
            log(f"block {i} (teacher layers {list(plan.blocks[i])}) as the only student layer: "
                f"calibration NLL {scores[i]:.4f} ({time.perf_counter() - t0:.1f}s)")
    return scores


def by_loss_order(scores: Mapping[int, float]) -> tuple[int, ...]:
    """Blocks in patch order: the highest loss (the worst stand-in) first; ties by block id."""
    return tuple(sorted(scores, key=lambda i: (-scores[i], i)))


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def _kl_sums(params: Any, config: Any, batch: Mapping[str, jax.Array], teacher_final: jax.Array,
             teacher_head: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    out = forward(params, config, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                  return_logits=False)
    mask = batch["loss_mask"].astype(jnp.float32)
    nll, kl = chunked_ce_kl(out.final_hidden, head_kernel(params, config), teacher_final, teacher_head,
                            batch["targets"], mask, chunk=chunk, tau=1.0, use_ce=True, use_kl=True)
    return kl, nll, jnp.sum(mask)


@functools.partial(jax.jit, static_argnames=("config",))
def _final_hidden(params: Any, config: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    return forward(params, config, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                   return_logits=False).final_hidden


def kl_greedy_order(student: Any, teacher: Any, plan: LayerPlan, batches: Iterable[Mapping[str, np.ndarray]], *,
                    chunk: int = 128, log: Callable[[str], None] | None = None
                    ) -> tuple[tuple[int, ...], list[dict[str, float]]]:
    """KLPatch: the multi-layer blocks in patch order, chosen greedily by KL(teacher || model) on `batches`,
    and one record per chosen step {block, num_layers, kl, nll} (mean nats per token). `student`, `teacher`:
    (config, params) pairs. The teacher's final hidden states are computed once; logits are chunked."""
    batches = [{k: jnp.asarray(b[k]) for k in BATCH_KEYS} for b in batches]
    if not batches:
        raise ValueError("kl_greedy_order needs at least one calibration batch")
    t_config, t_params = teacher
    t_params = jax.tree.map(jnp.asarray, t_params)
    student = (student[0], jax.tree.map(jnp.asarray, student[1]))
    t_finals = [_final_hidden(t_params, t_config, b) for b in batches]
    t_head = head_kernel(t_params, t_config)

    def score(patched: frozenset[int]) -> tuple[float, float]:
        model: Model = interpolate(student, (t_config, t_params), plan, patched)
        sums = np.zeros(3)
        for b, tf in zip(batches, t_finals):
            sums += [float(x) for x in _kl_sums(model.params, model.config, b, tf, t_head, chunk)]
        if sums[2] == 0:
            raise ValueError("the calibration batches have no tokens in their loss masks")
        return sums[0] / sums[2], sums[1] / sums[2]

    multi = list(plan.multi_layer_blocks)
    chosen: list[int] = []
    steps: list[dict[str, float]] = []
    while len(chosen) < len(multi) - 1:  # the last block left is patched last: that step gives the teacher
        t0 = time.perf_counter()
        rest = [b for b in multi if b not in chosen]
        best = None
        for c in rest:
            patched = patched_first(plan, chosen + [c])
            kl, nll = score(patched)
            if best is None or kl < best[0]:
                best = (kl, nll, c, plan.num_layers(patched))
        chosen.append(best[2])
        steps.append({"block": best[2], "num_layers": best[3], "kl": round(best[0], 6), "nll": round(best[1], 6)})
        if log:
            log(f"KL patch step {len(chosen)}: block {best[2]} (teacher layers {list(plan.blocks[best[2]])}) -> "
                f"{best[3]} layers, KL to the teacher {best[0]:.4f}, NLL {best[1]:.4f} "
                f"({len(rest)} candidates, {time.perf_counter() - t0:.1f}s)")
    order = tuple(chosen + [b for b in multi if b not in chosen])
    return order, steps


def order_from_data(name: str, student: Any, teacher: Any, plan: LayerPlan,
                    batches: Iterable[Mapping[str, np.ndarray]], *, log: Callable[[str], None] | None = None
                    ) -> tuple[tuple[int, ...], dict[str, Any]]:
    """The order `name` (one of DATA_ORDERS) chosen on calibration `batches`, and what it was chosen from
    (`kl_steps` or `block_scores`, for the run's records). `student`, `teacher`: (config, params) pairs."""
    if name == KL_GREEDY:
        order, steps = kl_greedy_order(student, teacher, plan, batches, log=log)
        return order, {"kl_steps": steps}
    if name == BY_LOSS:
        scores = block_scores(student, teacher, plan, batches, log=log)
        return by_loss_order(scores), {"block_scores": {str(k): round(v, 5) for k, v in scores.items()}}
    raise ValueError(f"unknown data-chosen order {name!r}; known: {', '.join(DATA_ORDERS)}")
