"""Patch orders chosen from data: which student layer to swap back for its teacher block first.

`kl_greedy_order` (the demo's default, `kl-greedy`) is KLPatch ("Understanding Layer Patching in Model Size
Interpolation", 2026): starting from the student, patch at each step the block whose patching brings the model
closest to the teacher, measured by KL(teacher || model) per token on calibration text (K(K+1)/2 - 1 scored
models). A candidate differs from the model of the previous step only from the first layer it changes: the
layers before it run once per step, each candidate runs only the rest (`models.suffix`, one compiled program for
every candidate), against the teacher's distribution per token computed once (when it fits
TEACHER_CACHE_BYTES). Each step is chosen given the blocks already patched; a one-shot score ranks every block
once, in the context of the whole teacher, and after a short distillation that ranks well only near the teacher
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
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.logits import chunk_layout, chunk_logits, chunked_ce_kl, to_chunks
from boomerang_jax.models.nll import mean_nll
from boomerang_jax.models.suffix import embed_tokens, final_norm, run_layers
from boomerang_jax.models.transformer import forward, head_kernel
from boomerang_jax.surgery import (STUDENT, TEACHER, LayerPlan, Layout, Model, SurgeryError, check_compatible,
                                   interpolate, interpolated_config, layout, patch_sequence, patched_first)

BY_LOSS = "by-loss"
KL_GREEDY = "kl-greedy"
KL_TWO_SIDED = "kl-two-sided"  # kl-greedy with the back half of the order chosen from the teacher's side
KL_ORDERS = (KL_GREEDY, KL_TWO_SIDED)
DATA_ORDERS = KL_ORDERS + (BY_LOSS,)  # orders chosen from calibration text


def block_scores(student: Any, teacher: Any, plan: LayerPlan, batches: Iterable[Mapping[str, np.ndarray]], *,
                 chunk: int = 256, log: Callable[[str], None] | None = None, dtype: Any = jnp.float32
                 ) -> dict[int, float]:
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
        scores[i] = mean_nll(model.params, model.config, batches, chunk=chunk, dtype=dtype)
        if log:
            log(f"block {i} (teacher layers {list(plan.blocks[i])}) as the only student layer: "
                f"calibration NLL {scores[i]:.4f} ({time.perf_counter() - t0:.1f}s)")
    return scores


def by_loss_order(scores: Mapping[int, float]) -> tuple[int, ...]:
    """Blocks in patch order: the highest loss (the worst stand-in) first; ties by block id."""
    return tuple(sorted(scores, key=lambda i: (-scores[i], i)))


# A cached teacher distribution costs B x T x V float32 per calibration batch (SmolLM2, 4,096 tokens: 0.8 GB);
# above this, kl_greedy_order recomputes the teacher's logits from its final hidden states for every candidate.
TEACHER_CACHE_BYTES = 2 << 30


@functools.partial(jax.jit, static_argnames=("config", "chunk", "dtype"))
def _kl_sums(params: Any, config: Any, batch: Mapping[str, jax.Array], teacher_final: jax.Array,
             teacher_head: jax.Array, chunk: int, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    out = forward(params, config, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                  return_logits=False, dtype=dtype)
    mask = batch["loss_mask"].astype(jnp.float32)
    nll, kl = chunked_ce_kl(out.final_hidden, head_kernel(params, config), teacher_final, teacher_head,
                            batch["targets"], mask, chunk=chunk, tau=1.0, use_ce=True, use_kl=True)
    return kl, nll, jnp.sum(mask)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _final_hidden(params: Any, config: Any, batch: Mapping[str, jax.Array], dtype: Any) -> jax.Array:
    return forward(params, config, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                   return_logits=False, dtype=dtype).final_hidden


@functools.partial(jax.jit, static_argnames=("config", "num_slots", "dtype"))
def _prefix_states(stack: Any, layer_ids: jax.Array, count: jax.Array, slots: jax.Array, hidden: jax.Array,
                   batch: Mapping[str, jax.Array], config: Any, num_slots: int, dtype: Any) -> jax.Array:
    """The outputs of chosen layers (see `run_layers`) of a model run from its embedding output `hidden`."""
    _, buf = run_layers(stack, layer_ids, count, config, hidden, segment_ids=batch["segment_ids"],
                        positions=batch["positions"], slots=slots, num_slots=num_slots, dtype=dtype)
    return buf


_embed = jax.jit(embed_tokens, static_argnames=("config", "dtype"))


@functools.partial(jax.jit, static_argnames=("chunk",))
def _teacher_distribution(final: jax.Array, head: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """The teacher's next-token distribution p [n, B, c, V] and sum_v p log p [n, B, c], in sequence chunks."""
    c, n, pad = chunk_layout(final.shape[1], chunk)
    head = head.astype(jnp.float32)

    def body(carry: None, h: jax.Array) -> tuple[None, tuple[jax.Array, jax.Array]]:
        log_p = jax.nn.log_softmax(chunk_logits(h, head), axis=-1)
        p = jnp.exp(log_p)
        return carry, (p, jnp.sum(p * log_p, axis=-1))

    _, (p, neg_entropy) = jax.lax.scan(body, None, to_chunks(final, c, n, pad))
    return p, neg_entropy


def _ce_kl_to_cached(final: jax.Array, head: jax.Array, p_t: jax.Array, neg_entropy: jax.Array,
                     targets: jax.Array, mask: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Masked sums of NLL and KL(teacher || model) as `chunked_ce_kl` computes them, against a cached teacher
    distribution (`_teacher_distribution`): KL = sum_v p log p - sum_v p z + logsumexp(z)."""
    c, n, pad = chunk_layout(final.shape[1], chunk)
    head = head.astype(jnp.float32)

    def body(carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, ...]) -> tuple[Any, None]:
        ce_acc, kl_acc = carry
        h, p, ne, tgt, m = xs
        z = chunk_logits(h, head)
        lse = jax.nn.logsumexp(z, axis=-1)
        picked = jnp.take_along_axis(z, jnp.clip(tgt, 0, z.shape[-1] - 1)[..., None].astype(jnp.int32), axis=-1)
        keep = m != 0
        ce_acc = ce_acc + jnp.sum(jnp.where(keep, m * (lse - picked[..., 0]), 0.0))
        kl_tok = ne - jnp.sum(p * z, axis=-1) + lse
        kl_acc = kl_acc + jnp.sum(jnp.where(keep, m * kl_tok, 0.0))
        return (ce_acc, kl_acc), None

    xs = (to_chunks(final, c, n, pad), p_t, neg_entropy, to_chunks(targets, c, n, pad), to_chunks(mask, c, n, pad))
    zero = jnp.zeros((), jnp.float32)
    (ce_sum, kl_sum), _ = jax.lax.scan(body, (zero, zero), xs)
    return ce_sum, kl_sum


@functools.partial(jax.jit, static_argnames=("config", "chunk", "dtype"))
def _suffix_kl_sums(stack: Any, layer_ids: jax.Array, count: jax.Array, norm: Any, head: jax.Array,
                    hidden: jax.Array, batch: Mapping[str, jax.Array], teacher: Mapping[str, jax.Array], config: Any,
                    chunk: int, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`_kl_sums` of a model whose layers from some point on are `layer_ids[:count]` of `stack` (student layers,
    then teacher layers), run from `hidden` (the input of the first of them), with final norm `norm` and LM
    head `head`: one program for every such model of one architecture and batch shape."""
    h, _ = run_layers(stack, layer_ids, count, config, hidden, segment_ids=batch["segment_ids"],
                      positions=batch["positions"], dtype=dtype)
    final = final_norm(norm, config, h)
    mask = batch["loss_mask"].astype(jnp.float32)
    if "p" in teacher:
        nll, kl = _ce_kl_to_cached(final, head, teacher["p"], teacher["neg_entropy"], batch["targets"], mask, chunk)
    else:
        nll, kl = chunked_ce_kl(final, head, teacher["final"], teacher["head"], batch["targets"], mask, chunk=chunk,
                                tau=1.0, use_ce=True, use_kl=True)
    return kl, nll, jnp.sum(mask)


def _means(sums: np.ndarray) -> tuple[float, float]:
    if sums[2] == 0:
        raise ValueError("the calibration batches have no tokens in their loss masks")
    return sums[0] / sums[2], sums[1] / sums[2]


class _Scorer:
    """What both KLPatch scorers share: `score(base, candidates)` -> (KL, NLL) per candidate set of patched
    multi-layer blocks, and its one-step form."""

    def score(self, base: list[int], candidates: list[list[int]]) -> list[tuple[float, float]]:
        raise NotImplementedError

    def step(self, chosen: list[int], candidates: list[int]) -> dict[int, tuple[float, float]]:
        """(KL, NLL) of the model with chosen + [c] patched, for every candidate c."""
        return dict(zip(candidates, self.score(chosen, [chosen + [c] for c in candidates])))


class _WholeModelScorer(_Scorer):
    """The straightforward KLPatch scorer: every candidate model built whole and run from its embedding (the
    reference the fast scorer is tested against)."""

    def __init__(self, student: Model, teacher: Model, plan: LayerPlan, batches: list[dict[str, jax.Array]],
                 chunk: int, dtype: Any = jnp.float32) -> None:
        self.student, self.teacher, self.plan, self.batches, self.chunk = student, teacher, plan, batches, chunk
        self.dtype = jnp.dtype(dtype)
        self.t_finals = [_final_hidden(teacher.params, teacher.config, b, self.dtype) for b in batches]
        self.t_head = head_kernel(teacher.params, teacher.config)

    def score(self, base: list[int], candidates: list[list[int]]) -> list[tuple[float, float]]:
        """(KL, NLL) of the model with each candidate's multi-layer blocks patched (`base`: unused here)."""
        scores = []
        for blocks in candidates:
            model = interpolate(self.student, self.teacher, self.plan, patched_first(self.plan, blocks))
            sums = np.zeros(3)
            for b, tf in zip(self.batches, self.t_finals):
                sums += [float(x) for x in _kl_sums(model.params, model.config, b, tf, self.t_head, self.chunk,
                                                           self.dtype)]
            scores.append(_means(sums))
        return scores


class _SuffixScorer(_Scorer):
    """Scores every candidate of one greedy step from the current model's hidden state at the first layer the
    candidate changes: the shared prefix runs once per step, each candidate only its own suffix of layers.
    The teacher's distribution per token is cached when it takes at most `teacher_cache_bytes`."""

    def __init__(self, student: Model, teacher: Model, plan: LayerPlan, batches: list[dict[str, jax.Array]],
                 chunk: int, teacher_cache_bytes: int = TEACHER_CACHE_BYTES, dtype: Any = jnp.float32) -> None:
        self.student, self.teacher, self.plan, self.batches, self.chunk = student, teacher, plan, batches, chunk
        self.dtype = jnp.dtype(dtype)

        def concat(path: Any, s: jax.Array, t: jax.Array) -> jax.Array:
            if s.dtype != t.dtype:
                raise SurgeryError(f"layers{jax.tree_util.keystr(path)} is {s.dtype} in the student but {t.dtype} "
                                   "in the teacher; load both in the same dtype")
            return jnp.concatenate([s, t])

        self.stack = jax.tree.map_with_path(concat, student.params["layers"], teacher.params["layers"])
        self.models = {STUDENT: student, TEACHER: teacher}
        self.heads = {k: (m.params["final_norm"], head_kernel(m.params, m.config)) for k, m in self.models.items()}
        t_head = self.heads[TEACHER][1]
        t_finals = [_final_hidden(teacher.params, teacher.config, b, self.dtype) for b in batches]
        size = sum(b["tokens"].size for b in batches) * teacher.config.vocab_size * 4
        self.teacher_cached = size <= teacher_cache_bytes
        if self.teacher_cached:
            self.targets = [dict(zip(("p", "neg_entropy"), _teacher_distribution(tf, t_head, chunk)))
                            for tf in t_finals]
        else:
            self.targets = [{"final": tf, "head": t_head} for tf in t_finals]
        self._embedded: dict[str, list[jax.Array]] = {}

    def _embedding(self, source: str) -> list[jax.Array]:
        if source not in self._embedded:
            m = self.models[source]
            self._embedded[source] = [_embed(m.params, m.config, b["tokens"], self.dtype) for b in self.batches]
        return self._embedded[source]

    def _ids(self, lay: Layout, start: int) -> tuple[jax.Array, jax.Array, ModelConfig]:
        """Stack indices of the layout's layers from `start` on (padded to the teacher's depth), their count, and
        the architecture's config as every program of this scorer gets it."""
        m, n = self.plan.num_student_layers, self.plan.num_teacher_layers
        ids = [j if src == STUDENT else m + j for src, j in lay.layers[start:]]
        config = interpolated_config(self.student.config, self.teacher.config, lay)
        return (jnp.asarray(ids + [0] * (n - len(ids)), jnp.int32), jnp.asarray(len(ids), jnp.int32),
                config.replace(num_layers=n, tie_word_embeddings=False))

    def score(self, base: list[int], candidates: list[list[int]]) -> list[tuple[float, float]]:
        """(KL, NLL) of the model with each candidate's multi-layer blocks patched, every candidate run from the
        hidden state of the model with `base` patched at the first block where the two differ."""
        plan, s, t = self.plan, self.student, self.teacher
        tied = dict(student_tied=s.config.tie_word_embeddings, teacher_tied=t.config.tie_word_embeddings)
        current = layout(plan, patched_first(plan, base), **tied)
        jobs = []
        for blocks in candidates:
            lay = layout(plan, patched_first(plan, blocks), **tied)
            first = min(set(lay.patched) ^ set(current.patched))  # the first student layer that changes
            start = sum(len(plan.blocks[i]) if i in current.patched else 1 for i in range(first))
            jobs.append((start, lay))
        # the current model's hidden states where candidates start (HF index i: the output of its layer i - 1)
        inner = sorted({start for start, _ in jobs if start > 0})
        hidden: dict[int, list[jax.Array]] = {}
        if inner:
            num_slots = len(plan.multi_layer_blocks)  # at least the candidates: one program for every step
            slot_of = {i - 1: k for k, i in enumerate(inner)}
            slots = jnp.asarray([slot_of.get(layer, num_slots) for layer in range(plan.num_teacher_layers)],
                                jnp.int32)
            ids, _, config = self._ids(current, 0)
            count = jnp.asarray(inner[-1], jnp.int32)  # no layer after the last wanted output
            bufs = [_prefix_states(self.stack, ids, count, slots, h, b, config, num_slots, self.dtype)
                    for b, h in zip(self.batches, self._embedding(current.embedding))]
            hidden = {i: [buf[k] for buf in bufs] for k, i in enumerate(inner)}
        scores = []
        for start, lay in jobs:
            inputs = hidden[start] if start else self._embedding(lay.embedding)
            ids, count, config = self._ids(lay, start)
            norm, head = self.heads[lay.head]
            sums = np.zeros(3)
            for b, h, target in zip(self.batches, inputs, self.targets):
                sums += [float(x) for x in _suffix_kl_sums(self.stack, ids, count, norm, head, h, b, target,
                                                           config, self.chunk, self.dtype)]
            scores.append(_means(sums))
        return scores


def kl_greedy_order(student: Any, teacher: Any, plan: LayerPlan, batches: Iterable[Mapping[str, np.ndarray]], *,
                    chunk: int = 128, log: Callable[[str], None] | None = None, fast: bool = True,
                    teacher_cache_bytes: int = TEACHER_CACHE_BYTES, from_teacher: int = 0,
                    dtype: Any = jnp.float32) -> tuple[tuple[int, ...], list[dict[str, float]]]:
    """KLPatch: the multi-layer blocks in patch order, chosen greedily by KL(teacher || model) on `batches`,
    and one record per size between student and teacher {block, num_layers, kl, nll} (mean nats per token;
    `block`: the one patched to reach that size). `student`, `teacher`: (config, params) pairs. The teacher's
    final hidden states are computed once; logits are chunked.

    `from_teacher` > 0 chooses the last `from_teacher` positions first, greedily from the teacher's side (each
    step turns back into its student layer the block whose stand-in keeps the model closest to the teacher, so
    the sizes next to the teacher are chosen as models of that size), then the rest from the student's side
    among the blocks left; the same number of scored models.

    `fast` (the default) runs, per step, the layers the candidates share once and each candidate only from the
    first layer it changes, against the teacher's distribution, cached when it takes at most
    `teacher_cache_bytes`; `fast=False` builds and runs every candidate whole (the reference of the tests).
    `dtype`: the compute dtype of every forward pass (models.matmul: float32 accumulation; KL in float32)."""
    batches = [{k: jnp.asarray(b[k]) for k in BATCH_KEYS} for b in batches]
    if not batches:
        raise ValueError("kl_greedy_order needs at least one calibration batch")
    s_model, t_model = (Model(m[0], jax.tree.map(jnp.asarray, m[1])) for m in (student, teacher))
    check_compatible(s_model.config, t_model.config, plan)
    multi = list(plan.multi_layer_blocks)
    most = max(len(multi) - 1, 0)
    if isinstance(from_teacher, bool) or not 0 <= from_teacher <= most:
        raise ValueError(f"from_teacher must be in [0, {most}] (multi-layer blocks - 1), got {from_teacher!r}")
    scorer = _SuffixScorer(s_model, t_model, plan, batches, chunk, teacher_cache_bytes, dtype) if fast \
        else _WholeModelScorer(s_model, t_model, plan, batches, chunk, dtype)
    at: dict[int, tuple[float, float]] = {}  # k patched blocks -> (KL, NLL) of that step's model

    def choose(base: list[int], options: list[list[int]], rest: list[int], side: str) -> int:
        """The block of `rest` whose candidate (`options`, in the same order) has the lowest KL."""
        t0 = time.perf_counter()
        scores = scorer.score(base, options)
        i = min(range(len(options)), key=lambda j: scores[j][0])  # ties go to the first candidate
        at[len(options[i])] = scores[i]
        if log:
            n = plan.num_layers(patched_first(plan, options[i]))
            log(f"KL patch step {len(options[i])} ({side}): block {rest[i]} (teacher layers "
                f"{list(plan.blocks[rest[i]])}) -> {n} layers, KL to the teacher {scores[i][0]:.4f}, "
                f"NLL {scores[i][1]:.4f} ({len(options)} candidates, {time.perf_counter() - t0:.1f}s)")
        return rest[i]

    tail: list[int] = []  # from the teacher's side: the blocks patched last, the very last first
    kept = list(multi)
    for _ in range(from_teacher):
        block = choose(kept, [[b for b in kept if b != c] for c in kept], kept, "from the teacher")
        tail.append(block)
        kept.remove(block)
    chosen: list[int] = []
    while len(chosen) < len(kept) - 1:  # the last block left is forced: that step gives the teacher or the tail
        rest = [c for c in kept if c not in chosen]
        chosen.append(choose(chosen, [chosen + [c] for c in rest], rest, "from the student"))
    order = tuple(chosen + [b for b in kept if b not in chosen] + tail[::-1])
    steps = [{"block": order[k - 1], "num_layers": plan.num_layers(patched_first(plan, order[:k])),
              "kl": round(at[k][0], 6), "nll": round(at[k][1], 6)} for k in sorted(at)]
    return order, steps


def order_from_data(name: str, student: Any, teacher: Any, plan: LayerPlan,
                    batches: Iterable[Mapping[str, np.ndarray]], *, log: Callable[[str], None] | None = None,
                    dtype: Any = jnp.float32) -> tuple[tuple[int, ...], dict[str, Any]]:
    """The order `name` (one of DATA_ORDERS) chosen on calibration `batches`, and what it was chosen from
    (`kl_steps` or `block_scores`, for the run's records). `student`, `teacher`: (config, params) pairs."""
    if name in KL_ORDERS:
        back = len(plan.multi_layer_blocks) // 2 if name == KL_TWO_SIDED else 0
        order, steps = kl_greedy_order(student, teacher, plan, batches, log=log, from_teacher=back, dtype=dtype)
        return order, {"kl_steps": steps}
    if name == BY_LOSS:
        scores = block_scores(student, teacher, plan, batches, log=log, dtype=dtype)
        return by_loss_order(scores), {"block_scores": {str(k): round(v, 5) for k, v in scores.items()}}
    raise ValueError(f"unknown data-chosen order {name!r}; known: {', '.join(DATA_ORDERS)}")
