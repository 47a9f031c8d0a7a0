"""Pruning and zero-shot interpolation: pure functions on parameter pytrees (docs/METHOD.md, sections 1
and 3).

`prune` keeps the first layer of every block of a `LayerPlan`; `interpolate` swaps any subset of student layers
back for their teacher blocks. The embedding comes from whoever supplies the first layer, the final norm and LM
head from whoever supplies the last; a tied model whose embedding and head come from different models becomes
untied. Nothing here does I/O (see `boomerang_jax.surgery.family_export` for exports).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from boomerang_jax.hf import names
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.model import Model
from boomerang_jax.models.transformer import Params
from boomerang_jax.surgery.plan import (
    STUDENT,
    TEACHER,
    LayerPlan,
    SurgeryError,
    check_patched,
)

# ModelConfig fields that may differ between a student and its teacher (everything else is the architecture).
_NON_ARCH_FIELDS = {"num_layers", "tie_word_embeddings", "max_position_embeddings",
                    "bos_token_id", "eos_token_id", "pad_token_id", "attention"}



# ----------------------------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every part of one interpolated model comes from ("student" or "teacher")."""

    patched: tuple[int, ...]  # student layers replaced by their teacher blocks, ascending
    layers: tuple[tuple[str, int], ...]  # per output layer: (model, layer index in that model)
    embedding: str  # source of the input embedding (whoever supplies the first layer)
    head: str  # source of the final norm and LM head (whoever supplies the last layer)
    tie_word_embeddings: bool

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def layout(plan: LayerPlan, patched: Iterable[int], *, student_tied: bool, teacher_tied: bool) -> Layout:
    """The layout of the model with `patched` student layers replaced in place by their teacher blocks.

    The result is tied only if embedding and head come from the same model and that model is tied.
    """
    p = check_patched(plan, patched)
    layers: list[tuple[str, int]] = []
    for i, block in enumerate(plan.blocks):
        layers += [(TEACHER, j) for j in block] if i in p else [(STUDENT, i)]
    embedding, head = layers[0][0], layers[-1][0]
    tied = embedding == head and (student_tied if embedding == STUDENT else teacher_tied)
    return Layout(tuple(sorted(p)), tuple(layers), embedding, head, tied)


@dataclasses.dataclass(frozen=True)
class HybridIndex:
    """Where an interpolated model's parts sit in the student and teacher stacks, as arrays a jitted step can
    gather with (so one compiled step serves every patched set of the same size).

    `layers[l]`: layer l's index in concat(student layers, teacher layers) (a teacher layer j is M + j);
    `hidden[i]`: the model's HF hidden-state index of the student's aligned index i (`plan.aligned_pairs`);
    `teacher_embedding` / `teacher_head`: whether the embedding / final norm and head are the teacher's.
    """

    layers: np.ndarray
    hidden: np.ndarray
    teacher_embedding: np.ndarray
    teacher_head: np.ndarray


def hybrid_index(plan: LayerPlan, patched: Iterable[int]) -> HybridIndex:
    """The gather indices of the model `interpolate(student, teacher, plan, patched)` builds (see HybridIndex)."""
    lay = layout(plan, patched, student_tied=True, teacher_tied=True)
    m = plan.num_student_layers
    layers = [j if src == STUDENT else m + j for src, j in lay.layers]
    sizes = [len(b) if i in lay.patched else 1 for i, b in enumerate(plan.blocks)]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    hidden = [int(bounds[s]) for s, _ in plan.aligned_pairs()]
    return HybridIndex(np.asarray(layers, np.int32), np.asarray(hidden, np.int32),
                       np.asarray(lay.embedding == TEACHER), np.asarray(lay.head == TEACHER))


# ------------------------------------------------------------------------------------ model surgery
def _model(x: Any, what: str) -> Model:
    if hasattr(x, "config") and hasattr(x, "params"):
        return Model(x.config, x.params)
    try:
        config, params = x
    except (TypeError, ValueError):
        raise SurgeryError(f"{what} must be (config, params) or have .config and .params, got {type(x)}") from None
    return Model(config, params)


def check_compatible(student: ModelConfig, teacher: ModelConfig, plan: LayerPlan) -> None:
    """Raise SurgeryError unless student and teacher share the architecture and fit `plan`."""
    for f in dataclasses.fields(ModelConfig):
        if f.name in _NON_ARCH_FIELDS:
            continue
        a, b = getattr(student, f.name), getattr(teacher, f.name)
        if a != b:
            raise SurgeryError(f"student and teacher differ in {f.name}: {a!r} (student) vs {b!r} (teacher); "
                               "interpolation needs the same architecture")
    if plan.num_teacher_layers != teacher.num_layers:
        raise SurgeryError(f"the plan is for a {plan.num_teacher_layers}-layer teacher, but the teacher has "
                           f"{teacher.num_layers} layers")
    if plan.num_student_layers != student.num_layers:
        raise SurgeryError(f"the plan has {plan.num_student_layers} blocks (student layers), but the student has "
                           f"{student.num_layers} layers")


def interpolated_config(student: ModelConfig, teacher: ModelConfig, lay: Layout) -> ModelConfig:
    """Config of an interpolated model: the embedding source's, with the new layer count and tie flag."""
    base = student if lay.embedding == STUDENT else teacher
    return base.replace(num_layers=lay.num_layers, tie_word_embeddings=lay.tie_word_embeddings)


def _xp(*arrays: Any) -> Any:
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def _take_layers(leaf: Any, idx: Sequence[int]) -> Any:
    return leaf[np.asarray(idx, dtype=np.int32)]


def _leaf_paths(tree: Params, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in tree.items():
        out += _leaf_paths(v, prefix + (k,)) if isinstance(v, dict) else [prefix + (k,)]
    return out


def _get(tree: Params, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def prune(teacher_params: Params, teacher_config: ModelConfig, plan: LayerPlan) -> Model:
    """The student: the teacher's kept layers (each block's first), embedding, final norm and LM head.

    Non-layer leaves are shared with the teacher, not copied (arrays are never mutated here).
    """
    if plan.num_teacher_layers != teacher_config.num_layers:
        raise SurgeryError(f"the plan is for a {plan.num_teacher_layers}-layer teacher, but the teacher has "
                           f"{teacher_config.num_layers} layers")
    params = {k: v for k, v in teacher_params.items() if k != "layers"}
    layers: dict = {}
    for path in _leaf_paths(teacher_params["layers"]):
        _set(layers, path, _take_layers(_get(teacher_params["layers"], path), plan.kept))
    params["layers"] = layers
    return Model(teacher_config.replace(num_layers=plan.num_student_layers), params)


def _runs(sources: Sequence[tuple[str, int]]) -> list[tuple[str, list[int]]]:
    """Consecutive layers from the same model grouped: [(model, [layer ids]), ...]."""
    runs: list[tuple[str, list[int]]] = []
    for model, layer in sources:
        if runs and runs[-1][0] == model:
            runs[-1][1].append(layer)
        else:
            runs.append((model, [layer]))
    return runs


def interpolate(student: Any, teacher: Any, plan: LayerPlan, patched: Iterable[int]) -> Model:
    """The model with `patched` student layers (any subset) replaced in place by their teacher blocks.

    `student`/`teacher` are (config, params) pairs or objects with .config and .params (e.g. a Model).
    Patching nothing gives the student exactly; patching everything gives the teacher exactly.
    """
    s, t = _model(student, "student"), _model(teacher, "teacher")
    check_compatible(s.config, t.config, plan)
    lay = layout(plan, patched, student_tied=s.config.tie_word_embeddings,
                 teacher_tied=t.config.tie_word_embeddings)
    models = {STUDENT: s, TEACHER: t}
    runs = _runs(lay.layers)
    layers: dict = {}
    for path in _leaf_paths(t.params["layers"]):
        leaves = {name: _get(m.params["layers"], path) for name, m in models.items()}
        if leaves[STUDENT].dtype != leaves[TEACHER].dtype:
            raise SurgeryError(f"layers/{'/'.join(path)} is {leaves[STUDENT].dtype} in the student but "
                               f"{leaves[TEACHER].dtype} in the teacher; load both in the same dtype")
        pieces = [_take_layers(leaves[name], idx) for name, idx in runs]
        _set(layers, path, pieces[0] if len(pieces) == 1 else _xp(*pieces).concatenate(pieces, axis=0))
    emb, head = models[lay.embedding], models[lay.head]
    params: dict = {"embed": emb.params["embed"], "final_norm": head.params["final_norm"], "layers": layers}
    if not lay.tie_word_embeddings:
        kernel = head.params["lm_head"]["kernel"] if not head.config.tie_word_embeddings \
            else head.params["embed"]["embedding"].T
        params["lm_head"] = {"kernel": kernel}
    return Model(interpolated_config(s.config, t.config, lay), params)


# --------------------------------------------------------------------------------------- counting
@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Unique parameters of one model (a tied embedding counts once).

    `embedding` counts the input embedding plus an untied LM head; `non_embedding` is everything else.
    """

    total: int
    embedding: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "non_embedding": self.non_embedding, "embedding": self.embedding}


_EMBEDDING_TARGETS = {("embed", "embedding"), ("lm_head", "kernel")}


def count_params(config: ModelConfig) -> ParamCount:
    """Parameter count of a model with this config, from shapes alone (no arrays needed)."""
    total = embedding = 0
    for e in names.entries(config):
        n = int(np.prod(e.hf_shape, dtype=np.int64)) * (config.num_layers if e.per_layer else 1)
        total += n
        if not e.per_layer and set(e.targets) <= _EMBEDDING_TARGETS:
            embedding += n
    return ParamCount(total, embedding)
