"""Family export: write every interpolated size of a student/teacher pair as HF directories plus `family.json`.

Tensors stream from TensorSources (surgery.tensors: memory-mapped safetensors or in-memory params) straight
into each size's files, layer by layer, so peak host memory is about teacher + student whatever the number of
sizes. Output and inputs may be local or `gs://` (boomerang_jax.infra.storage). Locally the whole family is
assembled in a hidden sibling directory and renamed into place at the end: a failed run leaves any previous
family untouched. On a bucket each size is uploaded as soon as it is written (its config.json last) and
`family.json` goes up at the very end, after every size: readers require it (`read_family`), so an
interrupted export never looks complete (an interrupted `--overwrite` leaves no complete family at all:
rerun it).

A student HF directory carries its layer plan in `boomerang_plan.json` (see `save_student`). The commands
`boomerang prune` / `boomerang interpolate` are in boomerang_jax.commands.family.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from boomerang_jax.hf.export import (
    COMMIT_ORDER,
    DEFAULT_MAX_SHARD_BYTES,
    LeafGetter,
    save_hf,
)
from boomerang_jax.hf.load import np_dtype
from boomerang_jax.infra import publish, storage
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.surgery.model_card import README, size_card, teacher_facts
from boomerang_jax.surgery.plan import (
    STUDENT,
    TEACHER,
    LayerPlan,
    Order,
    SurgeryError,
    num_steps,
    patch_sequence,
    patched_for,
)
from boomerang_jax.surgery.tensors import PLAN_FILE, TensorSource
from boomerang_jax.surgery.transforms import (
    Layout,
    check_compatible,
    count_params,
    interpolated_config,
    layout,
)

SIZE_FILE = "boomerang_size.json"  # one size's family.json entry, inside that size's HF directory
FAMILY_FILE = "family.json"
FAMILY_FORMAT = "boomerang-family"
FAMILY_VERSION = 1
DTYPES = ("auto", "float32", "bfloat16", "float16")


class FamilyError(ValueError):
    """A family export that cannot be done as asked (no plan, bad sizes, unsupported source or target)."""


def plan_files(plan: LayerPlan) -> dict[str, bytes]:
    """`extra_files` for save_hf that make an HF directory carry its student plan."""
    return {PLAN_FILE: plan.to_json().encode()}


# ------------------------------------------------------------------------------------------------ exports
def resolve_dtype(dtype: str, *sources: TensorSource) -> np.dtype:
    """'auto' = the dtype every source is stored in (float32 if they differ); otherwise that dtype."""
    if dtype != "auto":
        return np_dtype(dtype)
    stored = {s.dtype for s in sources}
    return stored.pop() if len(stored) == 1 else np.dtype(np.float32)


def layout_getter(lay: Layout, sources: dict[str, TensorSource]) -> LeafGetter:
    """A LeafGetter for one interpolated model, routing each leaf to the source the layout names."""

    def get(path: tuple[str, ...], layer: int | None) -> np.ndarray:
        if layer is not None:
            model, src_layer = lay.layers[layer]
            return sources[model].get(path, src_layer)
        if path[0] == "embed":
            return sources[lay.embedding].get(path, None)
        if path[0] == "final_norm":
            return sources[lay.head].get(path, None)
        head = sources[lay.head]
        if head.config.tie_word_embeddings:  # an untied output taking its head from a tied model
            return head.get(("embed", "embedding"), None).T
        return head.get(path, None)

    return get


def read_family(family_dir: str | os.PathLike) -> dict[str, Any]:
    """The family.json of a family directory (local or `gs://`); without it the family is not complete."""
    path = storage.join(family_dir, FAMILY_FILE)
    try:
        family = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise FamilyError(f"{path}: missing; {family_dir} is not a complete family export (from `boomerang "
                          "interpolate`; an export that did not finish has no family.json)") from None
    except json.JSONDecodeError as e:
        raise FamilyError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(family, dict) or family.get("format") != FAMILY_FORMAT:
        got = family.get("format") if isinstance(family, dict) else family
        raise FamilyError(f"{path}: format {got!r}, expected {FAMILY_FORMAT!r}")
    sizes = family.get("sizes")
    if not isinstance(sizes, list) or not all(isinstance(s, dict) and "dir" in s for s in sizes):
        raise FamilyError(f"{path}: 'sizes' must be a list of objects each with a 'dir'")
    for i, size in enumerate(sizes):
        try:
            storage.check_relative(size["dir"], where=str(path), what=f"sizes[{i}].dir")
        except storage.UnsafePathError as e:
            raise FamilyError(str(e)) from None
    return family


def save_student(
    out_dir: str | os.PathLike,
    student: TensorSource,
    plan: LayerPlan,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a student as an HF directory that carries its plan (`boomerang_plan.json`)."""
    if plan.num_student_layers != student.config.num_layers:
        raise FamilyError(f"the plan has {plan.num_student_layers} blocks but {student.where} has "
                          f"{student.config.num_layers} layers")
    return save_hf(out_dir, student.config, get=student.get, hf_config=student.hf_config,
                   tokenizer_files=student.tokenizer_files, generation_config=student.generation_config,
                   dtype=resolve_dtype(dtype, student), max_shard_bytes=max_shard_bytes,
                   extra_files=plan_files(plan), overwrite=overwrite)


def pruned_source(teacher: TensorSource, plan: LayerPlan) -> TensorSource:
    """The pruned (naive, undistilled) student as a lazy TensorSource over the teacher: layer i is kept[i]."""
    if plan.num_teacher_layers != teacher.config.num_layers:
        raise FamilyError(f"the plan is for a {plan.num_teacher_layers}-layer teacher, but {teacher.where} has "
                          f"{teacher.config.num_layers} layers")

    def get(path: tuple[str, ...], layer: int | None) -> np.ndarray:
        return teacher.get(path, None if layer is None else plan.kept[layer])

    return dataclasses.replace(teacher, config=teacher.config.replace(num_layers=plan.num_student_layers), get=get,
                               where=f"prune({teacher.where})", plan=plan)


def size_name(k: int, num_layers: int, width: int = 2) -> str:
    """Directory name of step k of a family, e.g. 'k03-19L'."""
    return f"k{k:0{width}d}-{num_layers}L"


def size_entry(lay: Layout, config: ModelConfig, k: int | None, name: str) -> dict[str, Any]:
    """One size's record in family.json."""
    return {
        "k": k, "dir": name, "num_layers": lay.num_layers, "patched": list(lay.patched),
        "embedding": lay.embedding, "head": lay.head, "tie_word_embeddings": lay.tie_word_embeddings,
        "params": count_params(config).to_dict(),
        "layers": [f"{model}:{layer}" for model, layer in lay.layers],
    }


def to_json(obj: Any, indent: int = 0) -> str:
    """JSON with one key per line but lists of scalars (layers, blocks) kept on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {to_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        return "[\n" + ",\n".join(inner + to_json(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def order_name(order: Order) -> str:
    """How an order is named in messages and family.json: its name, or 'custom'."""
    return order if isinstance(order, str) else "custom"


def parse_sizes(spec: str, plan: LayerPlan, order: Order) -> list[int]:
    """Steps k of `order` from 'all', 'k=0,3,5-7' or layer counts 'N,M'; sorted, without repeats."""
    steps = num_steps(plan)
    spec = spec.strip()
    if spec == "all":
        return list(range(steps + 1))
    by_layers = {plan.num_layers(patched_for(plan, order, k)): k for k in range(steps + 1)}
    is_k = spec.startswith("k=")
    ks: set[int] = set()
    for part in filter(None, (p.strip() for p in (spec[2:] if is_k else spec).split(","))):
        lo, dash, hi = part.partition("-")
        try:
            values = range(int(lo), int(hi) + 1) if dash else [int(lo)]
        except ValueError:
            raise FamilyError(f"--sizes {spec!r}: cannot read {part!r} (use all, k=0,2,4-6 or layer counts N,M)")
        for v in values:
            if is_k:
                if not 0 <= v <= steps:
                    raise FamilyError(f"--sizes {spec!r}: k={v} is out of range; {order_name(order)} has k = 0..{steps}")
                ks.add(v)
            elif v in by_layers:
                ks.add(by_layers[v])
            else:
                raise FamilyError(f"--sizes {spec!r}: no {order_name(order)} size has {v} layers; sizes are "
                                  f"{', '.join(map(str, sorted(by_layers)))} layers")
    if not ks:
        raise FamilyError(f"--sizes {spec!r} selects no size")
    return sorted(ks)


def family_head(student: TensorSource, teacher: TensorSource, plan: LayerPlan, order: Order, dt: np.dtype,
                card: dict[str, str] | None = None) -> dict[str, Any]:
    """family.json without its sizes: format, order (name and sequence), inputs, dtype, plan, teacher facts."""
    return {"format": FAMILY_FORMAT, "version": FAMILY_VERSION, "order": order_name(order),
            "patch_order": list(patch_sequence(plan, order)), "student": student.where, "teacher": teacher.where,
            "dtype": str(dt), "plan": plan.to_dict(),
            "card": card if card is not None else teacher_facts(teacher.where, teacher.hf_config)}


def check_pair(student: TensorSource, teacher: TensorSource, plan: LayerPlan | None, order: Order) -> LayerPlan:
    """The plan (default: the student's own), checked against both models and `order`."""
    plan = plan or student.plan
    if plan is None:
        raise FamilyError(f"{student.where}: no layer plan ({PLAN_FILE} missing); pass one (--plan)")
    check_compatible(student.config, teacher.config, plan)
    try:
        patch_sequence(plan, order)
    except SurgeryError as e:
        raise FamilyError(str(e)) from None
    return plan


def write_size(dest: str | os.PathLike, plan: LayerPlan, patched: Iterable[int], sources: dict[str, TensorSource],
               family: dict[str, Any], *, k: int | None, name: str, dtype: np.dtype,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False, made_by: str | None = None,
               evaluation: dict[str, Any] | None = None, note: str | None = None) -> dict[str, Any]:
    """Write one size (any patched set) as an HF directory at `dest`, streaming each tensor from the source the
    layout names, with its boomerang_size.json and model card; returns its family.json record. The one writer
    of sizes: the family export, `materialise` and `pick` all go through it."""
    student, teacher = sources[STUDENT], sources[TEACHER]
    lay = layout(plan, patched, student_tied=student.config.tie_word_embeddings,
                 teacher_tied=teacher.config.tie_word_embeddings)
    config = interpolated_config(student.config, teacher.config, lay)
    base = sources[lay.embedding]
    other = sources[TEACHER if lay.embedding == STUDENT else STUDENT]
    entry = size_entry(lay, config, k, name)
    card = size_card(entry, family, made_by=made_by, evaluation=evaluation, note=note)
    save_hf(dest, config, get=layout_getter(lay, sources), hf_config=base.hf_config,
            tokenizer_files=base.tokenizer_files or other.tokenizer_files, generation_config=base.generation_config,
            dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
            extra_files={SIZE_FILE: (to_json({"order": family["order"], **entry}) + "\n").encode(),
                         README: card.encode()})
    return entry


def export_family(
    student: TensorSource,
    teacher: TensorSource,
    out_dir: str | os.PathLike,
    *,
    plan: LayerPlan | None = None,
    order: Order = "last-to-first",
    ks: Iterable[int] | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    log: Callable[[str], None] | None = None,
    made_by: str | None = None,
    card: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write sizes `ks` (default: all) of `order` under `out_dir`, one HF directory each (with its model card),
    plus family.json.

    `order` is a named order (ORDERS) or an explicit sequence of the plan's multi-layer blocks; family.json
    records it as `order` (the name, or "custom") and `patch_order` (the sequence). `made_by` (the command
    line) and `card` (the teacher's base_model / license; default: `teacher_facts`) go into the model cards.

    Returns the family.json content. `plan` defaults to the student's own (from its boomerang_plan.json).
    `out_dir` may be local or `gs://` (see the module docstring for what a failure leaves behind).
    """
    if not overwrite and publish.occupied(out_dir, FAMILY_FILE):  # fail before any work
        raise FamilyError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    plan = check_pair(student, teacher, plan, order)
    steps = num_steps(plan)
    ks = list(range(steps + 1)) if ks is None else sorted(set(ks))
    for k in ks:
        patched_for(plan, order, k)  # validates k before any work
    dt = resolve_dtype(dtype, student, teacher)
    sources = {STUDENT: student, TEACHER: teacher}
    family = family_head(student, teacher, plan, order, dt, card)
    with publish.publish_dir(out_dir, marker=FAMILY_FILE, overwrite=overwrite, last=COMMIT_ORDER,
                             error=FamilyError) as pub:
        tmp = pub.path
        sizes = []
        for k in ks:
            t0 = time.perf_counter()
            patched = patched_for(plan, order, k)
            name = size_name(k, plan.num_layers(patched), len(str(steps)))
            entry = write_size(tmp / name, plan, patched, sources, family, k=k, name=name, dtype=dt,
                               max_shard_bytes=max_shard_bytes, made_by=made_by)
            pub.flush(name)  # on a bucket: upload this size now, so local disk holds one size at a time
            sizes.append(entry)
            if log:
                log(f"k={k:>{len(str(steps))}} {entry['num_layers']:>3} layers  "
                    f"{entry['params']['total'] / 1e6:9.2f}M "
                    f"params  embedding {entry['embedding']}, head {entry['head']}  -> {name} "
                    f"({time.perf_counter() - t0:.1f}s)")
        family["sizes"] = sizes
        (tmp / FAMILY_FILE).write_text(to_json(family) + "\n")
    return family
