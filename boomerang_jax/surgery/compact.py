"""The compact family: the teacher and the student stored once, every size built from them on demand.

A compact family directory holds `student/` and `teacher/` (plain HF directories, in the family's dtype; the
student carries its boomerang_plan.json), `family.json` (the plan, the patch order and every size of the order,
as a full export lists them, with `"compact": true`) and a README.md. Storage is teacher + student, whatever
the number of sizes. It is published like every export (boomerang_jax.infra.publish: locally renamed into place
when complete; on a bucket family.json goes up last).

`materialise_size` writes any size (a step of the order, or any patched set) as a plain HF directory through the
family export's own writer (`family_export.write_size`), so its files are byte for byte those of the full export
of that size. `build_size` builds a size in memory as JAX params, `to_transformers` as a standard
`transformers` model (no custom code). Both work on a compact family and on a full one that holds its student
(k=0) and teacher (k=K) sizes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from boomerang_jax.hf.export import COMMIT_ORDER, DEFAULT_MAX_SHARD_BYTES, hf_tensors, params_getter, save_hf
from boomerang_jax.infra import publish, storage
from boomerang_jax.models.config import to_hf
from boomerang_jax.models.model import HFFiles, Model
from boomerang_jax.surgery.family_export import (
    FAMILY_FILE,
    FamilyError,
    check_pair,
    family_head,
    layout_getter,
    plan_files,
    read_family,
    resolve_dtype,
    size_entry,
    size_name,
    to_json,
    write_size,
)
from boomerang_jax.surgery.model_card import README, family_card
from boomerang_jax.surgery.plan import (
    STUDENT,
    TEACHER,
    LayerPlan,
    Order,
    SurgeryError,
    check_patched,
    num_steps,
    patched_for,
)
from boomerang_jax.surgery.tensors import TensorSource, materialise, open_hf_source
from boomerang_jax.surgery.transforms import interpolated_config, layout

STORED = {STUDENT: "student", TEACHER: "teacher"}  # where a compact family keeps its two models


def export_compact_family(
    student: TensorSource,
    teacher: TensorSource,
    out_dir: str | os.PathLike,
    *,
    plan: LayerPlan | None = None,
    order: Order = "last-to-first",
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    made_by: str | None = None,
    card: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write `student/`, `teacher/`, family.json (every size of `order`, none stored) and README.md under
    `out_dir` (local or gs://); returns the family.json content."""
    if not overwrite and publish.occupied(out_dir, FAMILY_FILE):
        raise FamilyError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    plan = check_pair(student, teacher, plan, order)
    dt = resolve_dtype(dtype, student, teacher)
    family = family_head(student, teacher, plan, order, dt, card)
    steps = num_steps(plan)
    sizes = []
    for k in range(steps + 1):
        patched = patched_for(plan, order, k)
        lay = layout(plan, patched, student_tied=student.config.tie_word_embeddings,
                     teacher_tied=teacher.config.tie_word_embeddings)
        config = interpolated_config(student.config, teacher.config, lay)
        sizes.append(size_entry(lay, config, k, size_name(k, lay.num_layers, len(str(steps)))))
    family.update(compact=True, stored=dict(STORED), sizes=sizes)
    with publish.publish_dir(out_dir, marker=FAMILY_FILE, overwrite=overwrite, last=COMMIT_ORDER,
                             error=FamilyError) as pub:
        for role, src in ((STUDENT, student), (TEACHER, teacher)):
            save_hf(pub.path / STORED[role], src.config, get=src.get, hf_config=src.hf_config,
                    tokenizer_files=src.tokenizer_files, generation_config=src.generation_config, dtype=dt,
                    max_shard_bytes=max_shard_bytes, extra_files=plan_files(plan) if role == STUDENT else None)
            pub.flush(STORED[role])
            if log:
                log(f"{role}: {src.config.num_layers} layers -> {storage.join(out_dir, STORED[role])}")
        (pub.path / README).write_text(family_card(family, made_by=made_by))
        (pub.path / FAMILY_FILE).write_text(to_json(family) + "\n")
    return family


# ----------------------------------------------------------------------------------------- reading a family
@dataclasses.dataclass
class Family:
    """A family directory opened for building sizes: its family.json, plan, and lazy student/teacher sources."""

    where: str
    record: dict[str, Any]
    plan: LayerPlan
    student: TensorSource
    teacher: TensorSource

    @property
    def sources(self) -> dict[str, TensorSource]:
        return {STUDENT: self.student, TEACHER: self.teacher}

    @property
    def compact(self) -> bool:
        return bool(self.record.get("compact"))

    def patched(self, *, layers: int | None = None, k: int | None = None,
                patched: Iterable[int] | None = None) -> frozenset[int]:
        """The patched set of exactly one of: a layer count of the family's order, its step k, any set."""
        given = [n for n, v in (("layers", layers), ("k", k), ("patched", patched)) if v is not None]
        if len(given) != 1:
            raise FamilyError(f"{self.where}: give exactly one of layers, k or patched (got {given or 'none'})")
        seq = self.record["patch_order"]
        if patched is not None:
            try:
                return check_patched(self.plan, patched)
            except SurgeryError as e:
                raise FamilyError(f"{self.where}: {e}") from None
        steps = len(seq)
        if k is not None:
            if not 0 <= k <= steps:
                raise FamilyError(f"{self.where}: k={k} is out of range; the family's order has k = 0..{steps}")
            return patched_for(self.plan, seq, k)
        by_layers = {self.plan.num_layers(patched_for(self.plan, seq, i)): i for i in range(steps + 1)}
        if layers not in by_layers:
            raise FamilyError(f"{self.where}: no size of the family's order has {layers} layers (sizes: "
                              f"{', '.join(map(str, sorted(by_layers)))}); use patched=... for another set")
        return patched_for(self.plan, seq, by_layers[layers])

    def step_of(self, patched: frozenset[int]) -> int | None:
        """k when `patched` is a step of the family's order, else None."""
        seq = self.record["patch_order"]
        return next((k for k in range(len(seq) + 1) if patched_for(self.plan, seq, k) == patched), None)

    def name_of(self, patched: frozenset[int]) -> str:
        """The size's directory name: 'k03-19L' for a step of the order, 'p1-3-19L' for another set."""
        n, k = self.plan.num_layers(patched), self.step_of(patched)
        if k is not None:
            return size_name(k, n, len(str(len(self.record["patch_order"]))))
        return f"p{'-'.join(map(str, sorted(patched))) or 'none'}-{n}L"

    def entry(self, patched: frozenset[int]) -> dict[str, Any]:
        """The size's family.json record (as the full export writes it)."""
        lay = layout(self.plan, patched, student_tied=self.student.config.tie_word_embeddings,
                     teacher_tied=self.teacher.config.tie_word_embeddings)
        config = interpolated_config(self.student.config, self.teacher.config, lay)
        return size_entry(lay, config, self.step_of(patched), self.name_of(patched))


def open_family(family_dir: str | os.PathLike) -> Family:
    """A compact family, or a full one holding its student (k=0) and teacher (k=K) sizes; local or gs://."""
    where = str(family_dir)
    record = read_family(family_dir)
    plan = LayerPlan.from_dict(record.get("plan"), source=storage.join(where, FAMILY_FILE))
    if record.get("compact"):
        stored = record.get("stored") or STORED
        dirs = {role: stored.get(role, STORED[role]) for role in STORED}
        for role, d in dirs.items():
            storage.check_relative(d, where=storage.join(where, FAMILY_FILE), what=f"stored.{role}")
    else:
        by_patched = {tuple(s.get("patched", ())): s["dir"] for s in record["sizes"]}
        dirs = {STUDENT: by_patched.get(()), TEACHER: by_patched.get(tuple(range(plan.num_student_layers)))}
        if None in dirs.values():
            have = ", ".join(s["dir"] for s in record["sizes"])
            raise FamilyError(f"{storage.join(where, FAMILY_FILE)}: a full family needs its student (k=0) and "
                              f"teacher (k={num_steps(plan)}) sizes to build other sizes, but it holds only {have}; "
                              "re-export it with --sizes all, or with --compact")
    student = open_hf_source(storage.join(where, dirs[STUDENT]), plan=plan)
    teacher = open_hf_source(storage.join(where, dirs[TEACHER]))
    check_pair(student, teacher, plan, record["patch_order"])
    return Family(where, record, plan, student, teacher)


# ------------------------------------------------------------------------------------------ building sizes
def materialise_size(family: Family | str | os.PathLike, out_dir: str | os.PathLike, patched: Iterable[int], *,
                     dtype: str = "auto", overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     made_by: str | None = None, evaluation: dict[str, Any] | None = None,
                     note: str | None = None) -> dict[str, Any]:
    """Write the size with `patched` student layers patched as a plain HF directory at `out_dir` (local or
    gs://; atomic), streaming from the family's stored models; returns its record. `dtype` 'auto' keeps the
    stored dtype, so the files equal the full export's."""
    fam = family if isinstance(family, Family) else open_family(family)
    p = check_patched(fam.plan, patched)
    dt = resolve_dtype(dtype, fam.student, fam.teacher)
    record = dict(fam.record, dtype=str(dt))
    return write_size(out_dir, fam.plan, p, fam.sources, record, k=fam.step_of(p), name=fam.name_of(p), dtype=dt,
                      max_shard_bytes=max_shard_bytes, overwrite=overwrite, made_by=made_by, evaluation=evaluation,
                      note=note)


def build_size(family: Family | str | os.PathLike, *, layers: int | None = None, k: int | None = None,
               patched: Iterable[int] | None = None) -> Model:
    """One size in memory as a Model of host (numpy) JAX params, with the HF files its export would carry;
    exactly the parameters `materialise_size` writes (in the stored dtype)."""
    fam = family if isinstance(family, Family) else open_family(family)
    p = fam.patched(layers=layers, k=k, patched=patched)
    s, t = fam.student, fam.teacher
    lay = layout(fam.plan, p, student_tied=s.config.tie_word_embeddings, teacher_tied=t.config.tie_word_embeddings)
    config = interpolated_config(s.config, t.config, lay)
    base, other = (s, t) if lay.embedding == STUDENT else (t, s)
    source = dataclasses.replace(base, config=config, get=layout_getter(lay, fam.sources), plan=None,
                                 where=f"{fam.where}:{fam.name_of(p)}")
    files = HFFiles(base.hf_config, base.tokenizer_files or other.tokenizer_files, base.generation_config)
    return Model(config, materialise(source), files, source.where)


def to_transformers(model: Model, dtype: Any = None) -> Any:
    """A `transformers` AutoModelForCausalLM of the standard class for `model` (our config and state dict; no
    custom code, no trust_remote_code), in eval mode. Needs torch. `dtype`: torch dtype (default: the params')."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = to_hf(model.config, model.hf_config)
    for key in ("dtype", "torch_dtype", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    state = {}
    for name, arr in hf_tensors(model.config, params_getter(model.params)):
        arr = np.array(arr)  # a writable copy (the sources are read-only memory maps)
        if arr.dtype.name == "bfloat16":
            state[name] = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(arr)
    first = next(iter(state.values()))
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype or first.dtype)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "embed_out.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise FamilyError(f"{model.where or 'model'}: the state dict does not fit {type(hf).__name__} "
                          f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()
